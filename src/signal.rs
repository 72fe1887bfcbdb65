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

/// Reload requests: SIGHUP, installed now (from then on a hangup no longer terminates the
/// process), or a channel an in-process caller (a test) sends on. Each [`Hangups::recv`]
/// completes on the next one; `None` once none can come.
pub struct Hangups(Source);

enum Source {
    Signal(tokio::signal::unix::Signal),
    Channel(tokio::sync::mpsc::Receiver<()>),
}

impl Hangups {
    pub async fn recv(&mut self) -> Option<()> {
        match &mut self.0 {
            Source::Signal(signal) => {
                let got = signal.recv().await;
                if got.is_some() {
                    tracing::info!(signal = "SIGHUP", "configuration reload requested");
                }
                got
            }
            Source::Channel(requests) => requests.recv().await,
        }
    }

    /// Reload requests sent on the returned channel instead of by signal.
    pub fn channel() -> (tokio::sync::mpsc::Sender<()>, Hangups) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (tx, Hangups(Source::Channel(rx)))
    }
}

pub fn hangups() -> io::Result<Hangups> {
    Ok(Hangups(Source::Signal(signal(SignalKind::hangup())?)))
}
