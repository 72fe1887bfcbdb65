//! The `imds-broker` command line: `serve` runs the daemon, `check` validates a config file,
//! `lint` reviews session policies, `explain` shows which rule (or policy statement) decides,
//! `audit` makes the sealing key and verifies audit files.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter, fmt};

use crate::admin;
use crate::audit::checkpoint::{Expected, Finder};
use crate::audit::seal::{Checker, EpochKey, EpochPolicy};
use crate::audit::sink::{AuditLayer, AuditSink, SealSettings};
use crate::audit::{self, keyfile};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::credentials::{self, ProcessSettings, StsSource, SystemClock};
use crate::explain::{self, PolicyOutcome, Subject};
use crate::iam::lint::{self, Severity};
use crate::iam::source::Origin;
use crate::policy;
use crate::safe_dir::{self, SafeDir};
use crate::state::AppState;
use crate::token::TokenKey;
use crate::token::container::TokenStore;
use crate::token::file as token_file;
use crate::{reload, server, signal, systemd};
use tokio_util::sync::CancellationToken;

/// Command output on stdout. A reader that went away (`imds-broker status | head -1`) ends
/// the output quietly instead of panicking like `print!` would.
macro_rules! out {
    ($($arg:tt)*) => { emit(&format!($($arg)*)) };
}

macro_rules! outln {
    ($($arg:tt)*) => { emit(&format!("{}\n", format_args!($($arg)*))) };
}

fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// EX_USAGE from sysexits.h: the configuration (or the command line) is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "imds-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Log line format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config file: exit 0 if it is valid, 1 with one line per problem if not.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print each app's role and cached credentials, from a running daemon's admin listener.
    Status {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Container-endpoint token tools.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run CMD with AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
    /// set for APP (and static AWS key variables removed), so its SDK gets APP's credentials
    /// from the container endpoint. Reads the config unless --url and --token-file are given.
    Exec {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        app: String,
        /// The endpoint URL, instead of the config's first container.listen address.
        #[arg(long, requires = "token_file")]
        url: Option<String>,
        /// The token file, instead of the config's.
        #[arg(long, requires = "url")]
        token_file: Option<PathBuf>,
        #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Audit file tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Review every app's session policy for least privilege: one `file:line:col: severity:
    /// field: message` line per finding. Exit 0 if clean, 1 with warnings only, 2 with errors,
    /// 64 if the config cannot be read.
    Lint {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Lint one policy JSON file instead of a config's policies.
        #[arg(long, conflicts_with = "config")]
        policy: Option<PathBuf>,
    },
    /// Show which rule a process (or uid, cgroup, source address) matches, and why.
    /// Exit 0 if a rule matched, 1 if none did. With --app: whether that app's session policy
    /// alone allows --action on --resource, and which statement decided; exit 0 allowed,
    /// 1 denied, 3 undecided (a condition, a policy variable or a managed policy decides).
    Explain {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// An app (by name) whose session policy to evaluate.
        #[arg(long, conflicts_with_all = ["pid", "uid", "source"], requires_all = ["action", "resource"])]
        app: Option<String>,
        /// The action to evaluate, e.g. s3:GetObject.
        #[arg(long, requires = "app")]
        action: Option<String>,
        /// The resource ARN to evaluate, e.g. arn:aws:s3:::bucket/key.
        #[arg(long, requires = "app")]
        resource: Option<String>,
        /// A running process.
        #[arg(long, conflicts_with_all = ["uid", "source"])]
        pid: Option<u32>,
        /// A local caller with this uid (optionally with --gid, --exe, --cgroup).
        #[arg(long, conflicts_with = "source")]
        uid: Option<u32>,
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        #[arg(long, requires = "uid")]
        exe: Option<PathBuf>,
        #[arg(long, requires = "uid")]
        cgroup: Option<String>,
        /// A caller from another host or network namespace.
        #[arg(long)]
        source: Option<std::net::IpAddr>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Write a new container-endpoint token to APP's token file now; the old token stops
    /// working at once. Exit 0 when done, 1 if the daemon could not, 64 on a config error.
    Rotate {
        app: String,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check an audit file: its hash chain; with --key every seal; with --expect-seq (and
    /// --expect-hash) that it still holds the checkpoint the daemon published. Exit 0 if
    /// intact, 1 at the first broken line or without the checkpoint, 64 if a file is unreadable.
    Verify {
        file: PathBuf,
        /// The verification key (from `audit keygen`, or the one the daemon made at its first
        /// start).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The `audit_seq` of a checkpoint (log, /status, imds_broker_audit_last_seq): the file
        /// must reach it.
        #[arg(long)]
        expect_seq: Option<u64>,
        /// The checkpoint's `audit_hash`: the line at --expect-seq must have it.
        #[arg(long, requires = "expect_seq")]
        expect_hash: Option<String>,
    },
    /// Start audit sealing with a new key: the first key goes to the daemon's sealing state in
    /// the state directory and, as the verification key, to --out (mode 0400) for you to move
    /// off this host. Refuses if either exists. Exit 0 when done, 1 if refused, 64 on a config
    /// error.
    Keygen {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The state directory, instead of the config's server.state_dir.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

pub async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { config, log_format } => serve(config, log_format).await,
        Command::Check { config } => check(config),
        Command::Status { config } => status(config).await,
        Command::Token {
            command: TokenCommand::Rotate { app, config },
        } => rotate_token(config, &app).await,
        Command::Exec {
            config,
            app,
            url,
            token_file,
            command,
        } => exec(config, &app, url.zip(token_file), command),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    key,
                    expect_seq,
                    expect_hash,
                },
        } => audit_verify(
            &file,
            key.as_deref(),
            expect_seq.map(|seq| Expected {
                seq,
                hash: expect_hash,
            }),
        ),
        Command::Audit {
            command:
                AuditCommand::Keygen {
                    config,
                    state_dir,
                    out,
                },
        } => audit_keygen(config, state_dir, &out),
        Command::Lint { config, policy } => lint(config, policy),
        Command::Explain {
            config,
            app: Some(app),
            action: Some(action),
            resource: Some(resource),
            ..
        } => explain_policy(config, &app, &action, &resource),
        Command::Explain {
            config,
            pid,
            uid,
            gid,
            exe,
            cgroup,
            source,
            ..
        } => {
            let subject = match (pid, uid, source) {
                (Some(pid), _, _) => Subject::Pid(pid),
                (_, Some(uid), _) => Subject::Local {
                    uid,
                    gid,
                    exe,
                    cgroup,
                },
                (_, _, Some(ip)) => Subject::Source(ip),
                _ => {
                    eprintln!("explain needs one of --pid, --uid or --source");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            explain(config, subject)
        }
    }
}

async fn status(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rows = match admin::fetch(&config.admin, "/status").await {
        Ok((200, body)) => serde_json::from_str::<admin::StatusBody>(&body),
        Ok((code, body)) => {
            eprintln!("{}: HTTP {code}: {body}", config.admin);
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("cannot reach the daemon at {}: {e}", config.admin);
            return ExitCode::FAILURE;
        }
    };
    match rows {
        Ok(body) => {
            out!("{}", admin::status_table(&body.into()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unexpected status document: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn rotate_token(path: PathBuf, app: &str) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let target = format!("/container-tokens/{app}/rotate");
    match admin::request(&config.admin, "POST", &target).await {
        Ok((200, body)) => {
            out!("{body}");
            ExitCode::SUCCESS
        }
        Ok((_, body)) => {
            eprint!("{body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot reach the daemon at {}: {e}", config.admin);
            ExitCode::FAILURE
        }
    }
}

/// Replaces this process with `command`; returns only if that fails.
fn exec(
    path: PathBuf,
    app: &str,
    given: Option<(String, PathBuf)>,
    command: Vec<OsString>,
) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let target = match given {
        Some((url, token_file)) => crate::exec::Target { url, token_file },
        None => {
            let found = Config::load(&path)
                .map_err(|e| {
                    format!("{e}\n(pass --url and --token-file where the config is not readable)")
                })
                .and_then(|config| crate::exec::target(&config, app).map_err(|e| e.to_string()));
            match found {
                Ok(target) => target,
                Err(e) => {
                    eprintln!("imds-broker exec: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    if let Err(e) = crate::exec::check_readable(&target.token_file) {
        eprintln!("imds-broker exec: {e}");
        return ExitCode::FAILURE;
    }
    let set = crate::exec::environment(&target);
    let Some((program, args)) = command.split_first() else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let mut child = std::process::Command::new(program);
    child.args(args).envs(set);
    for name in crate::exec::CLEARED {
        child.env_remove(name);
    }
    let e = child.exec();
    eprintln!("imds-broker exec: {}: {e}", program.to_string_lossy());
    // The shell's codes: 127 not found, 126 found but not runnable.
    ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

fn audit_verify(
    file: &std::path::Path,
    key: Option<&std::path::Path>,
    expected: Option<Expected>,
) -> ExitCode {
    if let Some(hash) = expected.as_ref().and_then(|e| e.hash.as_ref())
        && !(hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        eprintln!("--expect-hash must be 64 hex digits (an audit_hash)");
        return ExitCode::from(EXIT_CONFIG);
    }
    let mut checker = match key.map(keyfile::read_verify_key) {
        None => None,
        Some(Ok(key)) => Some(Checker::new(key)),
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut finder = expected.map(Finder::new);
    let mut sealed = 0u64;
    let verified = audit::chain::verify_with(&text, |line| {
        sealed += u64::from(line.seal.is_some());
        if let Some(finder) = &mut finder {
            finder.see(line);
        }
        match &mut checker {
            Some(checker) => checker.check(line),
            None => Ok(()),
        }
    });
    let broken = |problem: &dyn std::fmt::Display| {
        outln!("{}: BROKEN: {problem}", file.display());
        ExitCode::FAILURE
    };
    let v = match verified {
        Ok(v) => v,
        Err(e) => return broken(&e),
    };
    let key_id = checker.as_ref().map(|c| c.key_id().to_owned());
    let seals = match checker.map(Checker::finish).transpose() {
        Ok(seals) => seals,
        Err(e) => return broken(&e),
    };
    let at_checkpoint = finder.as_ref().map(|f| f.expected().seq);
    if let Some(Err(e)) = finder.map(|f| f.finish(&v)) {
        return broken(&format!("checkpoint: {e}"));
    }
    let start = if v.from_genesis {
        "from the start of the chain".to_string()
    } else {
        format!("continuing a chain at seq {}", v.first_seq)
    };
    let mut report = format!(
        "{}: OK: {} events, {start}, last seq {} hash {}",
        file.display(),
        v.events,
        v.head.seq,
        v.head.hash
    );
    match (seals, key_id) {
        (Some(s), Some(key_id)) => {
            let epochs = if s.first_epoch == s.last_epoch {
                format!("epoch {}", s.first_epoch)
            } else {
                format!("epochs {}-{}", s.first_epoch, s.last_epoch)
            };
            report.push_str(&format!(
                "; sealed: {} lines in {epochs}, every seal valid (key {key_id})",
                s.sealed
            ));
            if s.unsealed > 0 {
                report.push_str(&format!(
                    "; the first {} lines predate sealing (the seal of line {} covers them)",
                    s.unsealed, s.first_line
                ));
            }
            if s.open {
                report.push_str(&format!(
                    "; epoch {} was still open: only a checkpoint shows lines cut from its end",
                    s.last_epoch
                ));
            }
        }
        _ if sealed > 0 => {
            report.push_str(&format!(
                "; {sealed} lines are sealed: check the seals with --key"
            ));
        }
        _ => {}
    }
    if let Some(seq) = at_checkpoint {
        report.push_str(&format!("; holds the checkpoint at seq {seq}"));
    }
    outln!("{report}");
    ExitCode::SUCCESS
}

fn audit_keygen(config: PathBuf, state_dir: Option<PathBuf>, out: &std::path::Path) -> ExitCode {
    let state_dir = match state_dir {
        Some(dir) => dir,
        None => match Config::load(&config) {
            Ok(config) => config.server.state_dir,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let state = state_dir.join(keyfile::STATE_FILE);
    match keyfile::read_state(&state_dir) {
        Ok(None) => {}
        Ok(Some(existing)) => {
            eprintln!(
                "{}: audit sealing already runs with key {} (epoch {}); to start over with a new key, stop the daemon and move that file and the audit file aside",
                state.display(),
                existing.key_id,
                existing.epoch
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    // Run as root for a daemon that runs as its own user: the state goes to the directory's owner.
    let owner = std::fs::metadata(&state_dir)
        .ok()
        .filter(|_| nix::unistd::geteuid().is_root())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        })
        .filter(|(uid, _)| *uid != 0);
    let key = EpochKey::generate();
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(e) = keyfile::write_verify_key(out, &key, &host) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = keyfile::create_state(&state_dir, &key, owner) {
        eprintln!("{e}");
        let _ = std::fs::remove_file(out);
        return ExitCode::FAILURE;
    }
    outln!(
        "audit sealing key {}: verification key written to {} (mode 0400): move it off this host, \
         since whoever holds it can forge seals, and check audit files with \
         `imds-broker audit verify --key FILE AUDIT_FILE`; the daemon seals from epoch 0 with {}",
        key.key_id,
        out.display(),
        state.display()
    );
    ExitCode::SUCCESS
}

fn explain(path: PathBuf, subject: Subject) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let caller = match explain::caller_for(&subject, &config) {
        Ok(caller) => caller,
        Err(e) => {
            eprintln!("cannot read {subject:?}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (report, matched) = explain::report(&config, &caller);
    out!("{report}");
    if matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Exit statuses of `lint`.
const LINT_WARNINGS: u8 = 1;
const LINT_ERRORS: u8 = 2;
/// `explain --app` when only IAM can decide.
const EXPLAIN_UNDECIDED: u8 = 3;

fn explain_policy(path: PathBuf, app: &str, action: &str, resource: &str) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(app) = config.apps.iter().find(|a| a.name == app) else {
        eprintln!("{}: no app named {app:?}", path.display());
        return ExitCode::from(EXIT_CONFIG);
    };
    if !action.contains(':') {
        eprintln!("--action must be service:Action, e.g. s3:GetObject");
        return ExitCode::from(EXIT_CONFIG);
    }
    let (report, outcome) = explain::policy_report(app, action, resource);
    out!("{report}");
    match outcome {
        PolicyOutcome::Allowed | PolicyOutcome::NoPolicy => ExitCode::SUCCESS,
        PolicyOutcome::Denied => ExitCode::FAILURE,
        PolicyOutcome::Undecided => ExitCode::from(EXPLAIN_UNDECIDED),
    }
}

fn lint(config: PathBuf, policy: Option<PathBuf>) -> ExitCode {
    let (texts, problems) = match policy {
        Some(file) => match std::fs::read_to_string(&file) {
            Ok(text) => {
                let origin = Origin::file(&file);
                let field = "policy".to_string();
                let text = crate::config::PolicyText {
                    field,
                    text,
                    origin,
                };
                (vec![text], Vec::new())
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => match crate::config::policy_texts(&config) {
            Ok(found) => found,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let mut worst = None;
    for p in &problems {
        outln!(
            "{}:{}:{}: error: {}: {}",
            p.path.display(),
            p.line,
            p.column,
            p.field,
            p.message
        );
        worst = Some(Severity::Error);
    }
    for t in &texts {
        for f in lint::lint(&t.text) {
            let (line, column) = t.origin.locate(&t.text, f.offset);
            outln!(
                "{}:{line}:{column}: {}: {}: {}",
                t.origin.path.display(),
                f.severity,
                t.field,
                f.message
            );
            worst = worst.max(Some(f.severity));
        }
    }
    match worst {
        None => {
            outln!("{} session policies: no findings", texts.len());
            ExitCode::SUCCESS
        }
        Some(Severity::Warning) => ExitCode::from(LINT_WARNINGS),
        Some(Severity::Error) => ExitCode::from(LINT_ERRORS),
    }
}

/// This host as `check` judges the rules against it: its addresses in this network namespace
/// and its cgroup subtrees that someone other than root controls.
fn host_view() -> policy::HostView {
    let addresses = nix::ifaddrs::getifaddrs()
        .map(|interfaces| {
            interfaces
                .filter_map(|i| i.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| std::net::IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
                })
                .collect()
        })
        .unwrap_or_default();
    policy::HostView {
        addresses,
        foreign_subtrees: crate::identity::cgroup::CgroupIndex::new().foreign_subtrees(),
    }
}

fn check(path: PathBuf) -> ExitCode {
    match Config::load(&path) {
        Ok(config) => {
            outln!("{}: OK, {} app(s)", path.display(), config.apps.len());
            for warning in &config.warnings {
                outln!("warning: {warning}");
            }
            for (i, j) in policy::shadowed(&config.apps) {
                outln!(
                    "warning: app[{j}] {:?} is shadowed by app[{i}] {:?}: every caller it matches is matched earlier",
                    config.apps[j].name,
                    config.apps[i].name
                );
            }
            for warning in policy::rule_warnings(&config.apps, &host_view()) {
                outln!("{warning}");
            }
            for app in &config.apps {
                outln!(
                    "  {}: {} -> {} ({}s, session {})",
                    app.name,
                    app.matcher
                        .as_ref()
                        .map_or_else(|| "container endpoint only".into(), |m| m.to_string()),
                    app.role_arn(),
                    app.assume_role_input().duration.as_secs(),
                    app.assume_role_input().session_name
                );
                if let Some(c) = &app.container {
                    outln!(
                        "    container endpoint: token {} (owner {}:{}, 0400)",
                        c.token_file.display(),
                        c.uid,
                        c.gid
                    );
                }
            }
            if let Some(c) = &config.container {
                let listen: Vec<String> = c.listen.iter().map(|a| a.to_string()).collect();
                outln!(
                    "container endpoint on {}, tokens rotated every {}",
                    listen.join(", "),
                    humantime::format_duration(c.rotate_every)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf, log_format: LogFormat) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            init_tracing(log_format, None);
            tracing::error!("invalid configuration:\n{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (audit, layer) = AuditSink::prepare(config.instance.hostname.clone());
    init_tracing(log_format, Some(layer));
    // The state directory before anything in it (the audit file and its sealing state, by
    // default): it must be the daemon's, reached without a link; one others may read is
    // narrowed, and said so below.
    let narrowed = match SafeDir::private(&config.server.state_dir) {
        Ok((_, narrowed)) => narrowed,
        Err(e) => {
            tracing::error!("refusing server.state_dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let seal = config.audit.seal.then(|| SealSettings {
        state_dir: config.server.state_dir.clone(),
        policy: EpochPolicy {
            every: config.audit.seal_epoch,
            events: config.audit.seal_epoch_events,
        },
    });
    let audit = match audit.start(&config.audit.path, seal) {
        Ok(sink) => sink,
        Err(e) => {
            tracing::error!(path = %config.audit.path.display(), "cannot open the audit file: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(mode) = narrowed {
        safe_dir::report_narrowed(&config.server.state_dir, mode);
    }
    let settings = ProcessSettings::load().await;
    if let Err(e) = credentials::check_not_own_source(&settings, &config.server.listen) {
        tracing::error!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let token_key = match TokenKey::load_or_create(&config.server.state_dir) {
        Ok(key) => key,
        Err(e) => {
            tracing::error!("cannot load the token key: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = Arc::new(StsSource::new(&config.sts).await);
    let listeners = match server::bind(&config.server.listen, config.server.hop_limit).await {
        Ok(listeners) => listeners,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let container = match open_container_endpoint(&config).await {
        Ok(container) => container,
        Err(e) => {
            tracing::error!("container endpoint: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Both handlers before the ready line: a signal right after it must not kill the process.
    let (shutdown, hangups) = match (signal::shutdown(), signal::hangups()) {
        (Ok(shutdown), Ok(hangups)) => (shutdown, hangups),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        config = %config.path.display(),
        apps = config.apps.len(),
        "imds-broker started"
    );
    let status = format!(
        "serving {} app(s) on {}",
        config.apps.len(),
        listeners
            .iter()
            .chain(container.iter().flat_map(|(_, l)| l))
            .filter_map(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let metrics = match crate::metrics::install() {
        Ok(handle) => handle,
        Err(e) => {
            tracing::error!("cannot install the metrics recorder: {e}");
            return ExitCode::FAILURE;
        }
    };
    let admin_listener = match admin::bind(&config.admin).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(admin = %config.admin, "cannot listen for admin requests: {e}");
            return ExitCode::FAILURE;
        }
    };
    audit::config_loaded(&path, config.apps.len(), 0);
    let state = AppState::new(config, token_key, source, Arc::new(SystemClock));
    // Prefetch apps and the background refresher, then reloads on SIGHUP.
    state.start_refresher();
    let mut endpoints: Vec<_> = {
        let router = crate::imds::router(state.clone());
        listeners.into_iter().map(|l| (l, router.clone())).collect()
    };
    if let Some((tokens, container_listeners)) = container {
        let router = crate::container::start(&state, tokens);
        endpoints.extend(container_listeners.into_iter().map(|l| (l, router.clone())));
    }
    reload::spawn_reloader(state.clone(), path.clone(), hangups, Some(audit.clone()));
    let background = CancellationToken::new();
    tokio::spawn(admin::serve(
        admin_listener,
        admin::router(state.clone(), metrics),
        background.clone(),
    ));
    // Only now is everything listening (IMDS and admin): say so, to scripts and to systemd.
    announce(endpoints.iter().map(|(l, _)| l));
    systemd::ready(&status);
    // After READY=1: a ping from a worker thread could otherwise overtake it.
    if let Some(interval) = systemd::watchdog_interval() {
        tokio::spawn(systemd::watchdog(interval, background.clone()));
    }
    let shutdown = async move {
        shutdown.await;
        systemd::stopping();
    };
    server::serve(state.clone(), endpoints, shutdown).await;
    state.stop_background().await;
    background.cancel();
    // Everything audited is written and its sealing epoch ended: the key left on disk cannot
    // re-seal any of it.
    audit.close();
    ExitCode::SUCCESS
}

/// The container endpoint's token store (with the tokens of an earlier run) and its bound
/// listeners, when `[container]` is configured.
async fn open_container_endpoint(
    config: &Config,
) -> Result<Option<(Arc<TokenStore>, Vec<tokio::net::TcpListener>)>, String> {
    let Some(settings) = &config.container else {
        return Ok(None);
    };
    token_file::ensure_token_dir(&settings.token_dir)
        .map_err(|e| format!("{}: {e}", settings.token_dir.display()))?;
    let tokens = TokenStore::open(&config.server.state_dir).map_err(|e| e.to_string())?;
    let listeners = server::bind(&settings.listen, config.server.hop_limit)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some((Arc::new(tokens), listeners)))
}

/// One `listening on ADDR` line per listener on stdout (IMDS first, then the container
/// endpoint, each in config order), so scripts and tests can use port 0.
fn announce<'a>(listeners: impl Iterator<Item = &'a tokio::net::TcpListener>) {
    let mut out = std::io::stdout().lock();
    for l in listeners {
        if let Ok(addr) = l.local_addr() {
            let _ = writeln!(out, "listening on {addr}");
        }
    }
    let _ = out.flush();
}

/// Logs go to stderr, filtered by `RUST_LOG`; audit events also go to the audit file whatever
/// the log level, so a quiet log never silences the audit trail.
fn init_tracing(format: LogFormat, audit: Option<AuditLayer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let log = match format {
        LogFormat::Text => fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let audit =
        audit.map(|layer| layer.with_filter(filter::filter_fn(|meta| meta.target() == "audit")));
    tracing_subscriber::registry().with(log).with(audit).init();
}
