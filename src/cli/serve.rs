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
use crate::{signal, systemd};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum LogFormat {
    Text,
    Json,
}

pub(super) async fn serve(path: PathBuf, log_format: LogFormat) -> ExitCode {
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
    let settings = ProcessSettings::load().await;
    if let Err(e) = credentials::check_not_own_source(&settings, &config.server.listen) {
        tracing::error!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let source = Arc::new(StsSource::new(&config.sts).await);
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
    };
    match daemon::run(config, listeners, shutdown, services).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            e.log();
            ExitCode::FAILURE
        }
    }
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
