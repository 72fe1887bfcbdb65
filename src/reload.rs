//! Config reload on SIGHUP: re-read and validate the file; if it is invalid keep running on the
//! old one and say why; otherwise swap it in, keeping cached credentials only for apps whose
//! AssumeRole input did not change. The same signal reopens the audit file (for logrotate), and
//! systemd hears RELOADING and READY around it.

use std::path::{Path, PathBuf};

use crate::audit;
use crate::audit::sink::AuditSink;
use crate::config::{Config, ConfigError};
use crate::signal::Hangups;
use crate::state::{AppState, ReloadSummary};

/// Reloads `path` on every SIGHUP in `hangups`, as background work of `state` (stopped by
/// [`AppState::stop_background`]).
pub fn spawn_reloader(
    state: AppState,
    path: PathBuf,
    mut hangups: Hangups,
    audit_file: Option<AuditSink>,
) {
    let task_state = state.clone();
    state.spawn_background("config reloader", move |stop| async move {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                }
            }
            crate::systemd::reloading();
            if let Some(sink) = &audit_file {
                sink.reopen();
            }
            // The outcome is logged and audited; the daemon keeps running either way.
            let _ = reload(&task_state, &path).await;
            // A renewed source certificate and key are read now too.
            if let Some(own) = task_state.own_source() {
                let own = own.clone();
                let _ = tokio::task::spawn_blocking(move || own.reload()).await;
            }
            crate::systemd::ready("configuration reloaded");
        }
    });
}

/// Loads `path` and applies it to `state`, or leaves `state` as it is if the file is unreadable
/// or invalid.
pub async fn reload(state: &AppState, path: &Path) -> Result<ReloadSummary, ConfigError> {
    // Reading the file and resolving user names block.
    let owned = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&owned))
        .await
        .expect("config loading does not panic");
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            audit::config_rejected(path, &e.to_string());
            return Err(e);
        }
    };
    // Applying writes container token files (and fsyncs them): off the async workers too.
    let applying = state.clone();
    let summary = tokio::task::spawn_blocking(move || applying.apply_config(config))
        .await
        .expect("applying a config does not panic");
    audit::config_loaded(path, summary.apps, summary.dropped);
    if summary.needs_restart {
        tracing::warn!(
            "a setting that takes effect on restart changed (server.listen, hop_limit or state_dir, sts.region or endpoint_url, [limits], [admin], [audit], [containers], [source] or container.listen); restart to apply it"
        );
    }
    Ok(summary)
}
