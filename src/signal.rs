//! Process signals: which one arrived is logged, so an operator can tell a stop from a crash (or
//! a reload request, SIGHUP).

use std::future::Future;
use std::io;

use tokio::signal::unix::{SignalKind, signal};

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that completes on the
/// first of them. Installing eagerly matters: a signal that arrives after the daemon announced
/// it is listening, but before anything polled this future, must still mean a clean shutdown.
pub fn shutdown() -> io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}

/// SIGHUP, installed now (from then on a hangup no longer terminates the process): each
/// [`Hangups::recv`] completes on the next one.
pub struct Hangups(tokio::signal::unix::Signal);

impl Hangups {
    pub async fn recv(&mut self) -> Option<()> {
        let got = self.0.recv().await;
        if got.is_some() {
            tracing::info!(signal = "SIGHUP", "configuration reload requested");
        }
        got
    }
}

pub fn hangups() -> io::Result<Hangups> {
    Ok(Hangups(signal(SignalKind::hangup())?))
}
