//! The `imds-broker` command line: one file per subcommand, each a thin adapter over the
//! library. `serve` runs the daemon ([`crate::daemon::run`]), `check` validates a config file,
//! `lint` reviews session policies, `explain` shows which rule (or policy statement) decides,
//! `status` and `token` talk to a running daemon's admin listener, `doctor` diagnoses from the
//! app's seat, `exec` runs a command with an app's container credentials, `audit` makes the
//! sealing key and verifies audit files; the hidden `generate` writes the manual pages and
//! shell completions from these definitions.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::audit::checkpoint::Expected;
use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::explain::Subject;

/// Command output on stdout. A reader that went away (`imds-broker status | head -1`) ends
/// the output quietly instead of panicking like `print!` would.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::emit(&format!($($arg)*)) };
}

macro_rules! outln {
    ($($arg:tt)*) => { $crate::cli::emit(&format!("{}\n", format_args!($($arg)*))) };
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

mod audit;
mod check;
mod doctor;
mod exec;
mod explain;
mod generate;
mod lint;
mod serve;
mod status;
mod token;

use serve::LogFormat;

/// Loads the config at `path`, or prints why not: then the command exits with
/// [`EXIT_CONFIG`].
fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

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
        /// Log format. Default: journal when stderr is the journal ($JOURNAL_STREAM names
        /// it, as under systemd), text otherwise.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
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
    /// From the app's seat: is the endpoint on this host, does it answer, which identity and
    /// role does the daemon give this caller, are credentials served, and would an SDK in this
    /// environment ask IMDS at all. One line per step, a fix for the first failure; exit 0
    /// only when an SDK here would get its credentials.
    Doctor {
        /// The endpoint, instead of AWS_EC2_METADATA_SERVICE_ENDPOINT or 169.254.169.254:80.
        #[arg(long)]
        endpoint: Option<SocketAddr>,
        /// As root: check as this uid (its group, its home directory, none of this
        /// environment's AWS_* variables).
        #[arg(long)]
        uid: Option<u32>,
        /// The role (by name) the caller should get.
        #[arg(long)]
        expect_role: Option<String>,
        /// As root: check from this running container's seat (its cgroup, network namespace,
        /// user and AWS_* environment), by name or id.
        #[arg(long, conflicts_with = "uid")]
        container: Option<String>,
        /// Where --container finds the runtime's socket (`[containers] runtime_socket`).
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
        #[arg(long, conflicts_with_all = ["pid", "uid", "source", "container"], requires_all = ["action", "resource"])]
        app: Option<String>,
        /// The action to evaluate, e.g. s3:GetObject.
        #[arg(long, requires = "app")]
        action: Option<String>,
        /// The resource ARN to evaluate, e.g. arn:aws:s3:::bucket/key.
        #[arg(long, requires = "app")]
        resource: Option<String>,
        /// A running process.
        #[arg(long, conflicts_with_all = ["uid", "source", "container"])]
        pid: Option<u32>,
        /// A running container, by name or id, as the runtime of `[containers]` describes it
        /// (its main process, its cgroup, its name, image and labels).
        #[arg(long, conflicts_with_all = ["uid", "source"])]
        container: Option<String>,
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
    /// Write the manual pages or the shell completions into DIR (for packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: GenerateCommand,
    },
}

#[derive(Debug, Subcommand)]
enum GenerateCommand {
    /// imds-broker.8 and one page per subcommand (imds-broker-serve.8, ...).
    Man { dir: PathBuf },
    /// imds-broker.bash, _imds-broker (zsh) and imds-broker.fish.
    Completions { dir: PathBuf },
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

pub async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { config, log_format } => serve::serve(config, log_format).await,
        Command::Check { config } => check::check(config),
        Command::Doctor {
            endpoint,
            uid,
            expect_role,
            container,
            config,
        } => {
            doctor::doctor(doctor::Args {
                endpoint,
                uid,
                expect_role,
                container,
                config,
            })
            .await
        }
        Command::Status { config } => status::status(config).await,
        Command::Token {
            command: TokenCommand::Rotate { app, config },
        } => token::rotate(config, &app).await,
        Command::Exec {
            config,
            app,
            url,
            token_file,
            command,
        } => exec::exec(config, &app, url.zip(token_file), command),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    key,
                    expect_seq,
                    expect_hash,
                },
        } => audit::verify(
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
        } => audit::keygen(config, state_dir, &out),
        Command::Lint { config, policy } => lint::lint(config, policy),
        Command::Generate {
            what: GenerateCommand::Man { dir },
        } => generate::man(&dir),
        Command::Generate {
            what: GenerateCommand::Completions { dir },
        } => generate::completions(&dir),
        Command::Explain {
            config,
            app: Some(app),
            action: Some(action),
            resource: Some(resource),
            ..
        } => explain::policy(config, &app, &action, &resource),
        Command::Explain {
            config,
            container: Some(container),
            ..
        } => explain::container(config, &container).await,
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
            explain::rule(config, subject)
        }
    }
}
