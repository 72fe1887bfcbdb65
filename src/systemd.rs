//! systemd integration: `sd_notify` state messages (READY, RELOADING, STOPPING, STATUS) and the
//! watchdog keep-alive, sent as datagrams to `$NOTIFY_SOCKET`, and whether stderr is the
//! journal (`$JOURNAL_STREAM`). Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Sends one notification, e.g. `"READY=1"`. Returns whether a notify socket was configured.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    // A leading '@' names a socket in the abstract namespace.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&path)?,
    };
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Logs instead of failing: a lost notification must not take the daemon down.
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// The daemon is serving.
pub fn ready(status: &str) {
    notify_or_log(&format!("READY=1\nSTATUS={status}"));
}

/// A reload starts; `ready` ends it.
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0);
    notify_or_log(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

pub fn stopping() {
    notify_or_log("STOPPING=1");
}

/// The interval at which systemd wants `WATCHDOG=1`, if the watchdog is on for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval until `stop`. The pings come from the async runtime,
/// so a wedged runtime stops them and systemd restarts the daemon.
pub async fn watchdog(interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => notify_or_log("WATCHDOG=1"),
        }
    }
}

/// Whether stderr is connected to the journal: `$JOURNAL_STREAM` is `DEVICE:INODE` of the
/// stream systemd connected, and it counts only if stderr's own `fstat` says the same (a child
/// that inherited the variable but not the stream, or whose stderr was redirected, is not).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&value.to_string_lossy(), stat.st_dev, stat.st_ino)
}

/// `value` (`DEVICE:INODE`, both decimal) names the file with this device and inode.
fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_matches_only_the_same_device_and_inode() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 12346));
        assert!(!journal_stream_matches("9:12345", 8, 12345));
        assert!(!journal_stream_matches("8", 8, 12345));
        assert!(!journal_stream_matches("", 0, 0));
        assert!(!journal_stream_matches("8:12345:1", 8, 12345));
        assert!(!journal_stream_matches(" 8:12345", 8, 12345));
    }
}
