//! `imds-broker serve`: loads the config (exit 64 if it is invalid), starts logging and the
//! audit file, binds the listeners and installs the signal handlers, then hands over to
//! [`daemon::run`] until SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::ValueEnum;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter, fmt};

use super::EXIT_CONFIG;
use crate::audit::sink::{AuditLayer, AuditSink};
use crate::config::Config;
use crate::credentials::{self, ProcessSettings, StsSource, SystemClock};
use crate::daemon::{self, Listeners, Services};
use crate::source::Source;
use crate::{signal, systemd};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum LogFormat {
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object a line on stderr.
    Json,
    /// Native journal entries, one journal field per event field (EVENT=, APP=, UID=, ...).
    Journal,
}

impl LogFormat {
    /// The format asked for, or without one: `journal` when stderr is the journal (a systemd
    /// service's default), `text` otherwise.
    fn resolve(asked: Option<LogFormat>) -> LogFormat {
        asked.unwrap_or(if systemd::stderr_is_journal() {
            LogFormat::Journal
        } else {
            LogFormat::Text
        })
    }
}

pub(super) async fn serve(path: PathBuf, log_format: Option<LogFormat>) -> ExitCode {
    let log_format = LogFormat::resolve(log_format);
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
    // The state directory and the audit file before anything else is written in it.
    let audit = match daemon::open_audit(&config, audit) {
        Ok(sink) => sink,
        Err(e) => {
            e.log();
            return ExitCode::FAILURE;
        }
    };
    let own = match Source::load(&config.source) {
        Ok(own) => Arc::new(own),
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Only the default chain could end up asking this daemon's own IMDS.
    if own.is_chain() {
        let settings = ProcessSettings::load().await;
        if let Err(e) = credentials::check_not_own_source(&settings, &config.server.listen) {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let source = Arc::new(match own.sdk_config(&config.sts).await {
        Some(shared) => StsSource::from_shared(&shared, config.sts.endpoint_url.as_deref()),
        None => StsSource::new(&config.sts).await,
    });
    raise_descriptor_limit();
    let listeners = match Listeners::bind(&config).await {
        Ok(listeners) => listeners,
        Err(e) => {
            e.log();
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
    let services = Services {
        source,
        clock: Arc::new(SystemClock),
        hangups,
        audit: Some(audit),
        announce: true,
        watchdog: systemd::watchdog_interval(),
        own: Some(own),
    };
    match daemon::run(config, listeners, shutdown, services).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            e.log();
            ExitCode::FAILURE
        }
    }
}

/// The soft descriptor limit up to the hard one, before anything is bound: connections, caller
/// lookups and the audit file all need descriptors, and `limits.max_connections` is fitted to
/// what this leaves (see [`crate::server::ConnectionCap`]).
fn raise_descriptor_limit() {
    let show = |n: Option<u64>| n.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    match crate::server::raise_descriptor_limit() {
        Ok(limit) if limit.before != limit.now => tracing::info!(
            before = %show(limit.before),
            soft = %show(limit.now),
            hard = %show(limit.hard),
            "raised the descriptor limit (RLIMIT_NOFILE)"
        ),
        Ok(limit) => tracing::info!(
            soft = %show(limit.now),
            hard = %show(limit.hard),
            "descriptor limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit (RLIMIT_NOFILE)"),
    }
}

/// What journal entries are tagged with (`SYSLOG_IDENTIFIER=`), whatever the binary is called.
const SYSLOG_IDENTIFIER: &str = "imds-broker";

/// Logs go to stderr or the journal, filtered by `RUST_LOG`; audit events also go to the audit
/// file whatever the log level, so a quiet log never silences the audit trail. Without a
/// journal to write to, `journal` falls back to text on stderr and says so.
fn init_tracing(format: LogFormat, audit: Option<AuditLayer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let text = || {
        fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let mut journal_error = None;
    let log = match format {
        LogFormat::Text => text(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
        LogFormat::Journal => match journal_layer() {
            Ok(layer) => layer.boxed(),
            Err(e) => {
                journal_error = Some(e);
                text()
            }
        },
    };
    let audit =
        audit.map(|layer| layer.with_filter(filter::filter_fn(|meta| meta.target() == "audit")));
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(audit)
        .init();
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "cannot write to the journal; logging text to stderr");
    }
}

/// Journal entries with each event field as a journal field of its own, named as the field in
/// upper case (`event` -> `EVENT`, `access_key_id` -> `ACCESS_KEY_ID`): no prefix, so
/// `journalctl EVENT=credentials.denied APP=billing` finds them. The crate drops leading `_`
/// and characters journald refuses, so no field can pose as a trusted one (`_UID`, `_PID`).
fn journal_layer() -> std::io::Result<tracing_journald::Layer> {
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned()))
}
