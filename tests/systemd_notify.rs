//! The systemd notify protocol through the real binary: READY=1 (with a status line) once it
//! listens, WATCHDOG=1 at half the watchdog interval, STOPPING=1 on SIGTERM; to a socket given
//! by path or in the abstract namespace.

#[path = "common/binary.rs"]
mod binary;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{}\"\n[sts]\nregion = \"us-east-1\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn exercise(socket: UnixDatagram, notify_socket: &str, dir: &std::path::Path) {
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (child, addr) = binary::serve(
        &config(dir),
        &[
            ("NOTIFY_SOCKET", notify_socket),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    assert_eq!(
        next(&socket),
        format!("READY=1\nSTATUS=serving 0 app(s) on {addr}")
    );
    assert_eq!(next(&socket), "WATCHDOG=1");
    assert_eq!(next(&socket), "WATCHDOG=1");
    binary::stop(child);
    // Watchdog pings may still be queued before the stop notice.
    let mut last = next(&socket);
    while last == "WATCHDOG=1" {
        last = next(&socket);
    }
    assert_eq!(last, "STOPPING=1");
}

#[test]
fn notifies_a_socket_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    exercise(socket, path.to_str().unwrap(), dir.path());
}

#[test]
fn notifies_an_abstract_socket() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("imds-broker-test-{}", std::process::id());
    let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    exercise(socket, &format!("@{name}"), dir.path());
}
