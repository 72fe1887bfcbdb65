//! The audit file: a tracing layer takes every `target: "audit"` event, whatever the log level,
//! and a writer thread appends it as one hash-chained JSON line to a 0600 file, fsync-ing once
//! per batch of queued events. The file is reopened on request (SIGHUP, for logrotate) and the
//! chain continues across restarts and rotations.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use rand::RngCore;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

use super::chain::{self, ChainHead};

/// The most events written before one fsync; the writer also syncs whenever the queue is empty.
const MAX_BATCH: usize = 256;
/// Events waiting for the writer. When it falls behind, emitters wait for room rather than the
/// queue growing without bound (or events being dropped: an audit trail has no gaps).
const QUEUE_EVENTS: usize = 16 * 1024;
/// How much of an existing file's tail is read to find where its chain stands.
const TAIL_BYTES: u64 = 64 * 1024;

enum Msg {
    Event(Map<String, Value>),
    Reopen,
    Flush(mpsc::Sender<()>),
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::SyncSender<Msg>,
}

/// The tracing layer that feeds the sink.
pub struct AuditLayer {
    tx: mpsc::SyncSender<Msg>,
    host: String,
}

impl AuditSink {
    /// Opens (creating with mode 0600) the audit file at `path` and starts the writer.
    pub fn open(path: &Path, host: String) -> io::Result<(AuditSink, AuditLayer)> {
        let writer = Writer::open(path.to_owned())?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_EVENTS);
        thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok((AuditSink { tx: tx.clone() }, AuditLayer { tx, host }))
    }

    /// Reopens the file by path (after logrotate moved it).
    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Returns once every event queued so far is written and synced.
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
    }
}

struct Writer {
    path: PathBuf,
    file: File,
    head: ChainHead,
}

impl Writer {
    fn open(path: PathBuf) -> io::Result<Self> {
        let (file, head) = open_file(&path)?;
        Ok(Self { path, file, head })
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut pending = vec![first];
            while pending.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => pending.push(m),
                    Err(_) => break,
                }
            }
            let mut acks = Vec::new();
            let mut buf = String::new();
            for msg in pending {
                match msg {
                    Msg::Event(fields) => {
                        buf.push_str(&chain::line(&mut self.head, fields));
                        buf.push('\n');
                    }
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Reopen => {
                        self.write(&mut buf);
                        self.reopen();
                    }
                }
            }
            self.write(&mut buf);
            for ack in acks {
                let _ = ack.send(());
            }
        }
    }

    fn write(&mut self, buf: &mut String) {
        if buf.is_empty() {
            return;
        }
        let result = self
            .file
            .write_all(buf.as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit file");
        }
        buf.clear();
    }

    fn reopen(&mut self) {
        match open_file(&self.path) {
            Ok((file, head)) => {
                self.file = file;
                // A fresh file after rotation continues the chain held in memory.
                if head.seq > self.head.seq {
                    self.head = head;
                }
                tracing::info!(path = %self.path.display(), "audit file reopened");
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot reopen the audit file; still writing the old one");
            }
        }
    }
}

/// Opens `path` for appending with mode 0600 (tightening an existing file), and reads where the
/// chain in it stands.
fn open_file(path: &Path) -> io::Result<(File, ChainHead)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    let head = last_head(&mut file)?;
    Ok((file, head))
}

fn last_head(file: &mut File) -> io::Result<ChainHead> {
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut tail = String::new();
    file.read_to_string(&mut tail)?;
    Ok(tail
        .lines()
        .rev()
        .find_map(chain::head_of)
        .unwrap_or_default())
}

impl<S: Subscriber> Layer<S> for AuditLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != "audit" {
            return;
        }
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        fields.insert(
            "id".into(),
            Value::from(id.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        );
        fields.insert("time".into(), Value::from(now_rfc3339()));
        fields.insert("host".into(), Value::from(self.host.clone()));
        fields.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str()),
        );
        let _ = self.tx.send(Msg::Event(fields));
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Collects an event's fields as JSON values.
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields arrive here too, already in their Display form.
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn audit_events_are_chained_into_a_private_file_across_reopen_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.log");
        let (sink, layer) = AuditSink::open(&path, "host-1".into()).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "audit", event = "token.issued", uid = 7u64, "one");
            tracing::info!(target: "other", "not audited");
            tracing::warn!(target: "audit", event = "credentials.denied", reason = "no_rule", "two");
        });
        sink.flush();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // Rotation: move the file away, reopen, write more.
        let rotated = dir.path().join("logs/audit.log.1");
        fs::rename(&path, &rotated).unwrap();
        sink.reopen();
        let (_, layer2) = (
            sink.clone(),
            AuditLayer {
                tx: sink.tx.clone(),
                host: "host-1".into(),
            },
        );
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer2), || {
            tracing::info!(target: "audit", event = "token.issued", "three");
        });
        sink.flush();

        let old = fs::read_to_string(&rotated).unwrap();
        let v = chain::verify(&old).unwrap();
        assert_eq!((v.events, v.from_genesis), (2, true));
        let first: Map<String, Value> = serde_json::from_str(old.lines().next().unwrap()).unwrap();
        assert_eq!(first["event"], "token.issued");
        assert_eq!(first["uid"], 7);
        assert_eq!(first["host"], "host-1");
        assert_eq!(first["message"], "one");
        let new = fs::read_to_string(&path).unwrap();
        let v2 = chain::verify(&new).unwrap();
        assert_eq!((v2.first_seq, v2.from_genesis), (3, false));
        assert!(new.contains(&format!("\"prev\":\"{}\"", v.head.hash)));

        // A restart picks the chain up where the file ends.
        let (sink3, layer3) = AuditSink::open(&path, "host-1".into()).unwrap();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer3), || {
            tracing::info!(target: "audit", event = "token.issued", "four");
        });
        sink3.flush();
        let v3 = chain::verify(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!((v3.first_seq, v3.head.seq), (3, 4));
    }

    #[test]
    fn more_events_than_the_queue_holds_all_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (sink, layer) = AuditSink::open(&path, "h".into()).unwrap();
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        const THREADS: usize = 4;
        let per_thread = QUEUE_EVENTS / 2;
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let dispatch = dispatch.clone();
                scope.spawn(move || {
                    tracing::dispatcher::with_default(&dispatch, || {
                        for i in 0..per_thread {
                            tracing::info!(target: "audit", event = "token.issued", t, i, "x");
                        }
                    });
                });
            }
        });
        sink.flush();
        let v = chain::verify(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v.events as usize, THREADS * per_thread, "none dropped");
    }
}
