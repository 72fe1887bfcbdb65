//! The audit file: a tracing layer takes every `target: "audit"` event, whatever the log level,
//! and a writer thread appends it as one hash-chained JSON line to a 0600 file, fsync-ing once
//! per batch of queued events. With sealing on, the writer also stamps each line with its epoch
//! and seals it ([`super::seal`]), ends epochs (by count, by time, at start-up, rotation and
//! shutdown) and publishes the chain's checkpoint ([`super::checkpoint`]). The file is reopened
//! on request (SIGHUP, for logrotate) and the chain continues across restarts and rotations.
//!
//! Crashes and failing storage: a torn last line (a kill or power loss mid-write) is cut off
//! at start-up and recorded as an `audit.truncated` line. A write or fsync that fails is cut
//! back to the last good offset, so no half line stays; the events in it are lost (counted)
//! and the writer reports itself failing ([`super::health`]) and retries every [`RETRY`]: the
//! first write that succeeds again is an `audit.gap` line saying how many were lost. A file
//! deleted while open is noticed before each batch and recreated at its path, the chain going
//! on from the last line written, after an `audit.file_deleted` line.
//!
//! A full queue never blocks the request path for long: an emitter waits at most
//! [`QUEUE_WAIT`] for room (a burst the writer is working through), and past that (the writer
//! is blocked in a write that does not return: a frozen or hung filesystem) the event is
//! dropped and counted ([`crate::metrics::AUDIT_QUEUE_DROPPED`]), the writer's next `audit.gap`
//! line includes it, and health reports the writer backlogged until it has caught up, so
//! `on_failure = "refuse"` refuses credentials meanwhile; while backlogged, events are dropped
//! without waiting. [`queued`] tells the emitting code whether its events made it into the
//! queue, so an issuance whose line was dropped is refused too.

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rand::RngCore;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

use super::chain::{self, ChainHead};
use super::checkpoint::{self, Checkpoint};
use super::health::{self, Health};
use super::seal::{EndReason, EpochPolicy, LastSealed, SealError, Sealer, Startup};

/// The most events written before one fsync; the writer also syncs whenever the queue is empty.
const MAX_BATCH: usize = 256;
/// Events waiting for the writer at most. When it is full, events are dropped and counted
/// rather than the emitter waiting (a request-path thread blocked on a writer that never
/// returns would stall every request) or the queue growing without bound.
pub const QUEUE_EVENTS: usize = 16 * 1024;
/// The writer counts as caught up once its queue is down to this many events.
const CAUGHT_UP: usize = QUEUE_EVENTS / 2;
/// How long an emitter waits for room in a full queue before it drops its event: long enough
/// for the writer to take a batch under load, short enough for an SDK's 1 s IMDS timeout.
pub const QUEUE_WAIT: Duration = Duration::from_millis(500);
/// How often a waiting emitter tries again.
const QUEUE_POLL: Duration = Duration::from_millis(1);
/// How much of an existing file's tail is read to find where its chain stands.
const TAIL_BYTES: u64 = 64 * 1024;
/// When an epoch's end line could not be written, how long until the next try by time.
const END_RETRY: Duration = Duration::from_secs(10);
/// While writes fail, how often the writer tries again without waiting for an event.
const RETRY: Duration = Duration::from_secs(1);

enum Msg {
    Event(Map<String, Value>),
    Reopen,
    Flush(mpsc::Sender<()>),
    /// The daemon is stopping: end the sealing epoch, then acknowledge.
    Stop(mpsc::Sender<()>),
}

/// Where the sealing state lives and when epochs end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealSettings {
    pub state_dir: PathBuf,
    pub policy: EpochPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("audit sealing: {0}")]
    Seal(#[from] SealError),
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::SyncSender<Msg>,
    queue: Arc<Queue>,
}

/// The tracing layer that feeds the sink.
pub struct AuditLayer {
    tx: mpsc::SyncSender<Msg>,
    host: String,
    queue: Arc<Queue>,
}

/// What the layer and the writer share about the queue between them.
struct Queue {
    /// Events sent and not yet taken by the writer.
    events: AtomicUsize,
    /// Events dropped since the writer last looked.
    dropped: AtomicU64,
    /// A reopen asked for while the queue was full.
    reopen: AtomicBool,
    health: Arc<Health>,
}

thread_local! {
    /// Whether an audit event emitted on this thread was dropped, since [`queued`] cleared it.
    static DROPPED_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `emit` and says whether every audit event it emitted (on this thread, through an
/// [`AuditLayer`]) is in the writer's queue. With no layer installed, nothing is dropped.
pub fn queued(emit: impl FnOnce()) -> bool {
    DROPPED_HERE.set(false);
    emit();
    !DROPPED_HERE.replace(false)
}

/// The sink before its writer starts: events are queued meanwhile. Lets the daemon install its
/// tracing subscriber (with the layer) before opening the file, so what opening it logs (a new
/// sealing key, a state caught up) reaches the log.
pub struct Unstarted {
    tx: mpsc::SyncSender<Msg>,
    rx: mpsc::Receiver<Msg>,
    host: String,
    queue: Arc<Queue>,
}

impl Unstarted {
    /// Opens (creating with mode 0600) the audit file at `path`, sets up sealing when `seal` is
    /// given, and starts the writer.
    pub fn start(self, path: &Path, seal: Option<SealSettings>) -> Result<AuditSink, OpenError> {
        let writer = Writer::open(
            path.to_owned(),
            self.host,
            seal,
            self.queue.health.clone(),
            Instant::now(),
        )?;
        let (rx, queue) = (self.rx, self.queue.clone());
        thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx, &queue))
            .map_err(|source| OpenError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(AuditSink {
            tx: self.tx,
            queue: self.queue,
        })
    }
}

impl AuditSink {
    /// The layer that feeds the sink, and the sink to start.
    pub fn prepare(host: String) -> (Unstarted, AuditLayer) {
        Self::prepare_reporting_to(host, health::process())
    }

    /// [`AuditSink::prepare`], reporting to `health` instead of the process's.
    fn prepare_reporting_to(host: String, health: Arc<Health>) -> (Unstarted, AuditLayer) {
        let (tx, rx) = mpsc::sync_channel(QUEUE_EVENTS);
        let queue = Arc::new(Queue {
            events: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            health,
        });
        let layer = AuditLayer {
            tx: tx.clone(),
            host: host.clone(),
            queue: queue.clone(),
        };
        (
            Unstarted {
                tx,
                rx,
                host,
                queue,
            },
            layer,
        )
    }

    /// [`AuditSink::prepare`] and [`Unstarted::start`] in one.
    pub fn open(
        path: &Path,
        host: String,
        seal: Option<SealSettings>,
    ) -> Result<(AuditSink, AuditLayer), OpenError> {
        let (unstarted, layer) = Self::prepare(host);
        Ok((unstarted.start(path, seal)?, layer))
    }

    /// Reopens the file by path (after logrotate moved it); a sealed epoch with lines in the
    /// old file ends there first.
    pub fn reopen(&self) {
        // Never waits for room: SIGHUP is handled on a runtime thread. The writer looks at the
        // flag before each batch.
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send(Msg::Reopen) {
            self.queue.reopen.store(true, Ordering::Release);
        }
    }

    /// Returns once every event queued so far is written and synced.
    pub fn flush(&self) {
        self.round_trip(Msg::Flush);
    }

    /// Returns once every event queued so far is written and synced and the sealing epoch has
    /// ended (so the key left on disk cannot seal any line written so far). For shutdown.
    pub fn close(&self) {
        self.round_trip(Msg::Stop);
    }

    fn round_trip(&self, msg: fn(mpsc::Sender<()>) -> Msg) {
        let (ack, done) = mpsc::channel();
        if self.tx.send(msg(ack)).is_ok() {
            let _ = done.recv();
        }
    }
}

struct Writer {
    path: PathBuf,
    file: File,
    host: String,
    /// Where the chain stands, with the lines not yet written.
    head: ChainHead,
    /// Where it stands in the file: the head after the last successful write.
    written: ChainHead,
    sealer: Option<Sealer>,
    /// The seq of the last checkpoint logged, and when.
    logged: Option<(u64, Instant)>,
    /// When a checkpoint is due in the log (held back by [`checkpoint::LOG_EVERY`]).
    log_due: Option<Instant>,
    /// Told whether the last write succeeded.
    health: Arc<Health>,
    /// The file's length after the last successful write: a failed one is cut back to it.
    good_len: u64,
    /// A failed write may have left bytes past `good_len` that could not be cut off yet.
    dirty: bool,
    /// Events not written since the last successful write, for the next `audit.gap` line.
    lost: u64,
    /// While writes fail, when to try again.
    retry_at: Option<Instant>,
}

impl Writer {
    fn open(
        path: PathBuf,
        host: String,
        seal: Option<SealSettings>,
        health: Arc<Health>,
        now: Instant,
    ) -> Result<Self, OpenError> {
        let Opened {
            file,
            last,
            len,
            torn,
        } = open_file(&path).map_err(|source| OpenError::Io {
            path: path.clone(),
            source,
        })?;
        health.recover();
        let head = last.as_ref().and_then(head_of).unwrap_or_default();
        let last_sealed = last.as_ref().and_then(LastSealed::of);
        let mut writer = Self {
            path,
            file,
            host,
            written: head.clone(),
            head,
            sealer: None,
            logged: None,
            log_due: None,
            health,
            good_len: len,
            dirty: false,
            lost: 0,
            retry_at: None,
        };
        match seal {
            Some(settings) => {
                let (sealer, startup) = Sealer::open(
                    settings.state_dir,
                    settings.policy,
                    last_sealed,
                    &writer.host,
                )?;
                writer.sealer = Some(sealer);
                match startup {
                    Startup::Continue => {}
                    Startup::EndEpoch => writer.end_epoch(EndReason::Restart, now)?,
                    Startup::Advance => writer.advance()?,
                }
            }
            None if last_sealed.is_some() => tracing::warn!(
                path = %writer.path.display(),
                "audit sealing is off ([audit] seal = false) but the audit file is sealed: \
                 `audit verify --key` reports the unsealed lines from here on"
            ),
            None => {}
        }
        if let Some(torn) = torn {
            writer.record_torn(&torn, now);
        }
        let first = writer.logged.is_none();
        writer.publish(now, first);
        Ok(writer)
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>, queue: &Queue) {
        loop {
            let first = match self.next_deadline() {
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                },
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.on_timer(Instant::now());
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
            };
            let mut pending = vec![first];
            while pending.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => pending.push(m),
                    Err(_) => break,
                }
            }
            let events = pending
                .iter()
                .filter(|m| matches!(m, Msg::Event(_)))
                .count();
            let left = queue
                .events
                .fetch_sub(events, Ordering::AcqRel)
                .saturating_sub(events);
            metrics::gauge!(crate::metrics::AUDIT_QUEUE).set(left as f64);
            // Dropped while the queue was full: in the next gap line, with the write failures.
            self.lost += queue.dropped.swap(0, Ordering::AcqRel);
            if queue.reopen.swap(false, Ordering::AcqRel) {
                pending.insert(0, Msg::Reopen);
            }
            self.handle(pending, Instant::now());
            if left <= CAUGHT_UP {
                queue.health.set_backlogged(false);
            }
        }
    }

    /// The next time the writer has work without a message: an epoch ending by time, a
    /// checkpoint held back.
    fn next_deadline(&self) -> Option<Instant> {
        let epoch = self.sealer.as_ref().and_then(Sealer::deadline);
        [epoch, self.log_due, self.retry_at]
            .into_iter()
            .flatten()
            .min()
    }

    fn handle(&mut self, pending: Vec<Msg>, now: Instant) {
        self.check_linked(now);
        self.write_gap(now);
        let mut acks = Vec::new();
        let mut buf = String::new();
        for msg in pending {
            match msg {
                Msg::Event(fields) => {
                    self.push(fields, &mut buf, now);
                    if let Some(reason) = self.sealer.as_ref().and_then(|s| s.due(now)) {
                        self.write(&mut buf);
                        self.end_epoch_or_log(reason, now);
                    }
                }
                Msg::Flush(ack) => acks.push(ack),
                Msg::Reopen => {
                    self.write(&mut buf);
                    self.end_epoch_if_lines(EndReason::Rotate, now);
                    self.reopen();
                }
                Msg::Stop(ack) => {
                    self.write(&mut buf);
                    self.end_epoch_if_lines(EndReason::Stop, now);
                    acks.push(ack);
                }
            }
        }
        self.write(&mut buf);
        self.after_writing(now, false);
        for ack in acks {
            let _ = ack.send(());
        }
    }

    fn on_timer(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|at| now >= at) {
            self.check_linked(now);
            if !self.write_gap(now) {
                self.retry_at = Some(now + RETRY);
            }
        }
        if let Some(reason) = self.sealer.as_ref().and_then(|s| s.due(now)) {
            self.end_epoch_or_log(reason, now);
        }
        self.after_writing(now, false);
    }

    /// Chains (and seals) one event into `buf`.
    fn push(&mut self, mut fields: Map<String, Value>, buf: &mut String, now: Instant) {
        if let Some(sealer) = &self.sealer {
            sealer.stamp(&mut fields);
        }
        self.push_stamped(fields, buf, now);
    }

    fn push_stamped(&mut self, fields: Map<String, Value>, buf: &mut String, now: Instant) {
        let mut fields = chain::link(&mut self.head, fields);
        if let Some(sealer) = &mut self.sealer {
            sealer.seal(&mut fields, now);
        }
        buf.push_str(&serde_json::to_string(&fields).expect("a JSON map serializes"));
        buf.push('\n');
    }

    fn end_epoch_if_lines(&mut self, reason: EndReason, now: Instant) {
        if self.sealer.as_ref().is_some_and(Sealer::has_lines) {
            self.end_epoch_or_log(reason, now);
        }
    }

    fn end_epoch_or_log(&mut self, reason: EndReason, now: Instant) {
        if let Err(e) = self.end_epoch(reason, now) {
            tracing::error!(error = %e, "cannot save the next audit sealing key; sealing with it anyway, and retrying");
        }
    }

    /// Ends the current sealing epoch: its end line, sealed with its key, is written and synced
    /// first; then the next key replaces it (in memory and in the state file) before any line of
    /// the next epoch. If the end line cannot be written the epoch goes on (and ends later).
    fn end_epoch(&mut self, reason: EndReason, now: Instant) -> Result<(), SealError> {
        let Some(sealer) = &self.sealer else {
            return Ok(());
        };
        let fields = envelope(sealer.end_fields(reason), &self.host, "INFO");
        let mut buf = String::new();
        self.push_stamped(fields, &mut buf, now);
        if !self.write(&mut buf) {
            if let Some(sealer) = &mut self.sealer {
                sealer.retry_end_at(now + END_RETRY);
            }
            return Ok(());
        }
        let result = self.advance();
        self.publish(now, true);
        result
    }

    fn advance(&mut self) -> Result<(), SealError> {
        match &mut self.sealer {
            Some(sealer) => sealer.advance(),
            None => Ok(()),
        }
    }

    /// Retries a state file that is behind, and publishes the checkpoint.
    fn after_writing(&mut self, now: Instant, force: bool) {
        if let Some(sealer) = &mut self.sealer
            && !sealer.is_saved()
            && let Err(e) = sealer.save()
        {
            tracing::error!(error = %e, "cannot save the audit sealing key");
        }
        self.publish(now, force);
    }

    /// Records where the file stands (for `/status` and the metrics) and logs it when a
    /// checkpoint is due: at once when `force`d, else at most every [`checkpoint::LOG_EVERY`].
    fn publish(&mut self, now: Instant, force: bool) {
        let current = Checkpoint {
            seq: self.written.seq,
            hash: self.written.hash.clone(),
            epoch: self.sealer.as_ref().map(Sealer::epoch),
            key_id: self.sealer.as_ref().map(|s| s.key_id().to_owned()),
        };
        checkpoint::record(current.clone());
        let logged_seq = self.logged.map(|(seq, _)| seq);
        if logged_seq == Some(current.seq) && !force {
            self.log_due = None;
            return;
        }
        let next_log = self.logged.map(|(_, at)| at + checkpoint::LOG_EVERY);
        if force || next_log.is_none_or(|at| now >= at) {
            checkpoint::log(&current);
            self.logged = Some((current.seq, now));
            self.log_due = None;
        } else {
            self.log_due = next_log;
        }
    }

    /// Appends `buf` and syncs; whether it is in the file. When not, the file is cut back to
    /// its last good length (now or before the next write), the chain goes back to the last
    /// line written, the lines of `buf` are counted as lost and the writer reports failing.
    fn write(&mut self, buf: &mut String) -> bool {
        self.write_counting(buf, true)
    }

    /// [`Writer::write`]; the lines of `buf` count as lost events only if `events`.
    fn write_counting(&mut self, buf: &mut String, events: bool) -> bool {
        if buf.is_empty() {
            return true;
        }
        let lines = buf.matches('\n').count() as u64;
        let bytes = buf.len() as u64;
        let result = self.append(buf.as_bytes());
        buf.clear();
        match result {
            Ok(()) => {
                self.written = self.head.clone();
                self.good_len += bytes;
                if self.health.failing().is_some() {
                    tracing::warn!(path = %self.path.display(), "the audit file is written again");
                }
                self.health.recover();
                self.retry_at = None;
                true
            }
            Err((op, e)) => {
                crate::metrics::audit_write_failed(op);
                if events {
                    metrics::counter!(crate::metrics::AUDIT_EVENTS_LOST).increment(lines);
                    self.lost += lines;
                }
                self.head = self.written.clone();
                self.dirty = true;
                let _ = self.cut_back();
                tracing::error!(
                    path = %self.path.display(), error = %e, op, lost = self.lost,
                    "cannot write the audit file; events are lost until it can be written again"
                );
                self.health
                    .fail(format!("{op} {}: {e}", self.path.display()));
                self.retry_at.get_or_insert(Instant::now() + RETRY);
                false
            }
        }
    }

    /// Cuts off what a failed write left, if anything, then appends `bytes` and syncs.
    fn append(&mut self, bytes: &[u8]) -> Result<(), (&'static str, io::Error)> {
        self.cut_back().map_err(|e| ("write", e))?;
        self.file.write_all(bytes).map_err(|e| ("write", e))?;
        self.file.sync_data().map_err(|e| ("fsync", e))
    }

    /// Truncates the file to its last good length after a failed write.
    fn cut_back(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.set_len(self.good_len)?;
            self.dirty = false;
        }
        Ok(())
    }

    /// After writes failed: the `audit.gap` line saying how many events were lost, as the
    /// first line written again. Whether nothing is owed (any more).
    fn write_gap(&mut self, now: Instant) -> bool {
        if self.lost == 0 {
            return true;
        }
        let lost = self.lost;
        let mut fields = Map::new();
        fields.insert("event".into(), Value::from("audit.gap"));
        fields.insert("lost".into(), Value::from(lost));
        fields.insert(
            "message".into(),
            Value::from(
                "audit events were lost: the audit file could not be written, or the writer's queue was full",
            ),
        );
        let fields = envelope(fields, &self.host, "WARN");
        let mut buf = String::new();
        self.push(fields, &mut buf, now);
        // The gap line itself is not an event to count as lost: it is written again next time.
        if self.write_counting(&mut buf, false) {
            self.lost -= lost;
            tracing::warn!(
                lost,
                "audit events lost while the file could not be written; recorded as audit.gap"
            );
            true
        } else {
            false
        }
    }

    /// A torn last line cut off at start-up, recorded in the chain.
    fn record_torn(&mut self, torn: &Torn, now: Instant) {
        tracing::warn!(
            path = %self.path.display(), bytes = torn.bytes, offset = torn.offset,
            "the audit file ended in a torn line (a crash mid-write); cut off and recorded as audit.truncated"
        );
        let mut fields = Map::new();
        fields.insert("event".into(), Value::from("audit.truncated"));
        fields.insert("bytes".into(), Value::from(torn.bytes));
        fields.insert("offset".into(), Value::from(torn.offset));
        fields.insert("sha256".into(), Value::from(torn.sha256.clone()));
        fields.insert(
            "message".into(),
            Value::from("a torn last line (crash mid-write) was cut off the audit file"),
        );
        let fields = envelope(fields, &self.host, "WARN");
        let mut buf = String::new();
        self.push(fields, &mut buf, now);
        self.write(&mut buf);
    }

    /// A file deleted while open (no link left) is recreated at its path: the chain goes on
    /// from the last line written, after an `audit.file_deleted` line.
    fn check_linked(&mut self, now: Instant) {
        match self.file.metadata() {
            Ok(meta) if meta.nlink() == 0 => {}
            _ => return,
        }
        tracing::error!(path = %self.path.display(), "the audit file was deleted while open; recreating it");
        self.end_epoch_if_lines(EndReason::Rotate, now);
        let old = self.written.clone();
        if !self.reopen() {
            return;
        }
        let mut fields = Map::new();
        fields.insert("event".into(), Value::from("audit.file_deleted"));
        fields.insert("path".into(), Value::from(self.path.display().to_string()));
        fields.insert("last_seq".into(), Value::from(old.seq));
        fields.insert(
            "message".into(),
            Value::from("the audit file was deleted while open; lines up to last_seq were in it"),
        );
        let fields = envelope(fields, &self.host, "ERROR");
        let mut buf = String::new();
        self.push(fields, &mut buf, now);
        self.write(&mut buf);
    }

    /// Whether the file at the path is now the one written.
    fn reopen(&mut self) -> bool {
        match open_file(&self.path) {
            Ok(Opened {
                file,
                last,
                len,
                torn,
            }) => {
                self.file = file;
                self.good_len = len;
                self.dirty = false;
                // A fresh file after rotation continues the chain held in memory.
                let head = last.as_ref().and_then(head_of).unwrap_or_default();
                if head.seq > self.head.seq {
                    self.head = head.clone();
                    self.written = head;
                }
                tracing::info!(path = %self.path.display(), "audit file reopened");
                if let Some(torn) = torn {
                    self.record_torn(&torn, Instant::now());
                }
                true
            }
            Err(e) => {
                crate::metrics::audit_write_failed("reopen");
                tracing::error!(path = %self.path.display(), error = %e, "cannot reopen the audit file; still writing the old one");
                false
            }
        }
    }
}

/// An audit file opened for appending.
struct Opened {
    file: File,
    /// Its last chained line.
    last: Option<Map<String, Value>>,
    len: u64,
    /// The torn last line cut off, if there was one.
    torn: Option<Torn>,
}

/// What was cut off the end of a file: a line without its newline (a crash mid-write) or a
/// last line that is not JSON (garbage a power loss left). A whole JSON line whose hash does
/// not match is kept: no crash writes that, and `audit verify` must report it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Torn {
    offset: u64,
    bytes: u64,
    sha256: String,
}

/// Opens `path` for appending with mode 0600 (tightening an existing file), cuts off a torn
/// last line, and reads its last chained line.
fn open_file(path: &Path) -> io::Result<Opened> {
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
    let torn = cut_torn(&mut file)?;
    let last = last_line(&mut file)?;
    let len = file.metadata()?.len();
    Ok(Opened {
        file,
        last,
        len,
        torn,
    })
}

/// Cuts a torn last line off `file` (see [`Torn`]), fsync-ing the cut.
fn cut_torn(file: &mut File) -> io::Result<Option<Torn>> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let complete = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        // No newline in the tail: torn only if the whole file is this one fragment.
        None if start == 0 => 0,
        None => return Ok(None),
    };
    let mut keep = complete;
    if keep == tail.len() && keep > 0 {
        // Every line is whole: the last one still must be JSON.
        let line_start = tail[..keep - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if line_start == 0 && start > 0 {
            return Ok(None);
        }
        if serde_json::from_slice::<Map<String, Value>>(&tail[line_start..keep - 1]).is_ok() {
            return Ok(None);
        }
        keep = line_start;
    }
    let dropped = &tail[keep..];
    if dropped.is_empty() {
        return Ok(None);
    }
    let offset = start + keep as u64;
    file.set_len(offset)?;
    file.sync_data()?;
    Ok(Some(Torn {
        offset,
        bytes: dropped.len() as u64,
        sha256: hex::encode(Sha256::digest(dropped)),
    }))
}

fn last_line(file: &mut File) -> io::Result<Option<Map<String, Value>>> {
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut tail = String::new();
    file.read_to_string(&mut tail)?;
    Ok(tail.lines().rev().find_map(|line| {
        let fields: Map<String, Value> = serde_json::from_str(line).ok()?;
        head_of(&fields).map(|_| fields)
    }))
}

/// The head a chained line leaves the chain at.
fn head_of(fields: &Map<String, Value>) -> Option<ChainHead> {
    Some(ChainHead {
        seq: fields.get("seq")?.as_u64()?,
        hash: fields.get("hash")?.as_str()?.to_owned(),
    })
}

/// Adds what every line carries besides its own fields: a random `id`, `time`, `host`, `level`.
fn envelope(mut fields: Map<String, Value>, host: &str, level: &str) -> Map<String, Value> {
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    fields.insert("id".into(), Value::from(hex::encode(id)));
    fields.insert("time".into(), Value::from(now_rfc3339()));
    fields.insert("host".into(), Value::from(host));
    fields.insert("level".into(), Value::from(level));
    fields
}

impl<S: Subscriber> Layer<S> for AuditLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != "audit" {
            return;
        }
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let fields = envelope(fields.0, &self.host, event.metadata().level().as_str());
        // Counted before sending, so the writer never takes more than was counted.
        let queue = &self.queue;
        queue.events.fetch_add(1, Ordering::AcqRel);
        if self.send_or_wait(Msg::Event(fields)) {
            return;
        }
        queue.events.fetch_sub(1, Ordering::AcqRel);
        DROPPED_HERE.set(true);
        queue.dropped.fetch_add(1, Ordering::AcqRel);
        metrics::counter!(crate::metrics::AUDIT_QUEUE_DROPPED).increment(1);
        metrics::counter!(crate::metrics::AUDIT_EVENTS_LOST).increment(1);
    }
}

impl AuditLayer {
    /// Queues `msg`, waiting up to [`QUEUE_WAIT`] for room unless the writer is already known
    /// to be behind; whether it was queued.
    fn send_or_wait(&self, msg: Msg) -> bool {
        let mut msg = match self.tx.try_send(msg) {
            Ok(()) => return true,
            Err(mpsc::TrySendError::Disconnected(_)) => return false,
            Err(mpsc::TrySendError::Full(msg)) => msg,
        };
        if self.queue.health.backlogged() {
            return false;
        }
        let deadline = Instant::now() + QUEUE_WAIT;
        while Instant::now() < deadline {
            // A poll, not a synchronisation: std's channel cannot wait with a deadline.
            thread::sleep(QUEUE_POLL);
            msg = match self.tx.try_send(msg) {
                Ok(()) => return true,
                Err(mpsc::TrySendError::Disconnected(_)) => return false,
                Err(mpsc::TrySendError::Full(msg)) => msg,
            };
        }
        self.queue.health.set_backlogged(true);
        false
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
    use crate::audit::keyfile;
    use crate::audit::seal::{Checker, EpochKey, SealReport};
    use std::os::unix::fs::MetadataExt;
    use tracing_subscriber::layer::SubscriberExt;

    /// A writer with health of its own (tests run side by side in one process).
    fn open_writer(
        path: PathBuf,
        host: String,
        seal: Option<SealSettings>,
        now: Instant,
    ) -> Result<Writer, OpenError> {
        Writer::open(path, host, seal, Arc::default(), now)
    }

    fn seal_settings(dir: &Path, events: u64) -> SealSettings {
        SealSettings {
            state_dir: dir.join("state"),
            policy: EpochPolicy {
                every: Duration::from_secs(900),
                events,
            },
        }
    }

    fn event(n: u64) -> Msg {
        let mut fields = Map::new();
        fields.insert("event".into(), Value::from("token.issued"));
        fields.insert("n".into(), Value::from(n));
        Msg::Event(envelope(fields, "h", "INFO"))
    }

    /// The verification key the daemon left in the state dir.
    fn verification_key(dir: &Path) -> EpochKey {
        let found = keyfile::verify_keys_in(&dir.join("state"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(fs::metadata(&found[0]).unwrap().mode() & 0o777, 0o400);
        keyfile::read_verify_key(&found[0]).unwrap()
    }

    fn check_sealed(text: &str, key: EpochKey) -> Result<SealReport, String> {
        let mut checker = Checker::new(key);
        chain::verify_with(text, |l| checker.check(l)).map_err(|e| e.to_string())?;
        checker.finish()
    }

    fn lines(path: &Path) -> Vec<Map<String, Value>> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// (epoch, event, reason) of each line.
    fn shape(path: &Path) -> Vec<(u64, String, Option<String>)> {
        lines(path)
            .iter()
            .map(|l| {
                (
                    l["epoch"].as_u64().unwrap(),
                    l["event"].as_str().unwrap().to_owned(),
                    l.get("reason").and_then(Value::as_str).map(str::to_owned),
                )
            })
            .collect()
    }

    fn state_epoch(dir: &Path) -> u64 {
        keyfile::read_state(&dir.join("state"))
            .unwrap()
            .unwrap()
            .epoch
    }

    fn end(epoch: u64, reason: &str) -> (u64, String, Option<String>) {
        (epoch, "audit.epoch_end".into(), Some(reason.into()))
    }

    fn ev(epoch: u64) -> (u64, String, Option<String>) {
        (epoch, "token.issued".into(), None)
    }

    #[test]
    fn epochs_end_by_count_and_the_trail_verifies_with_the_first_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let t0 = Instant::now();
        let mut w = open_writer(
            path.clone(),
            "h".into(),
            Some(seal_settings(dir.path(), 3)),
            t0,
        )
        .unwrap();
        w.handle((1..=7).map(event).collect(), t0);
        assert_eq!(
            shape(&path),
            [
                ev(0),
                ev(0),
                ev(0),
                end(0, "events"),
                ev(1),
                ev(1),
                ev(1),
                end(1, "events"),
                ev(2)
            ]
        );
        assert_eq!(state_epoch(dir.path()), 2);
        let text = fs::read_to_string(&path).unwrap();
        let report = check_sealed(&text, verification_key(dir.path())).unwrap();
        assert_eq!(
            (report.sealed, report.last_epoch, report.open),
            (9, 2, true)
        );
        assert!(check_sealed(&text, EpochKey::generate()).is_err());
        let first = &lines(&path)[3];
        assert_eq!(first["next_epoch"], 1);
        assert_eq!(
            first["key_id"],
            verification_key(dir.path()).key_id.as_str()
        );
        // The checkpoint was logged when epoch 1 ended; the last line's is held back a moment.
        assert_eq!(w.logged.map(|(seq, _)| seq), Some(8));
        assert_eq!(w.log_due, Some(t0 + checkpoint::LOG_EVERY));
        assert_eq!((w.written.seq, &w.written), (9, &w.head));
    }

    #[test]
    fn failed_writes_fsyncs_and_reopens_are_counted_by_op_and_leave_the_written_head() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let t0 = Instant::now();
        let mut w = open_writer(path.clone(), "h".into(), None, t0).unwrap();
        w.handle(vec![event(1)], t0);
        let good = w.written.clone();
        assert_eq!(good.seq, 1);
        // A file opened read-only refuses the write.
        w.file = File::open(&path).unwrap();
        w.handle(vec![event(2)], t0);
        assert_eq!(w.lost, 1);
        // One failure each: what the failed write left is not cut from the next handle, and
        // its gap line is not owed.
        (w.dirty, w.lost) = (false, 0);
        // A pipe takes the write but cannot be fsync-ed.
        let (_reader, pipe) = io::pipe().unwrap();
        w.file = File::from(std::os::fd::OwnedFd::from(pipe));
        w.handle(vec![event(3)], t0);
        assert_eq!(w.written, good, "nothing counts as written");
        // A rotation whose new file cannot be created.
        fs::write(dir.path().join("not-a-dir"), "").unwrap();
        w.path = dir.path().join("not-a-dir/audit.log");
        w.reopen();
        let text = metrics.render();
        for op in ["write", "fsync", "reopen"] {
            let line = format!("{}{{op=\"{op}\"}} 1", crate::metrics::AUDIT_WRITE_FAILURES);
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn an_epoch_ends_by_time_even_when_no_line_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let t0 = Instant::now();
        let every = Duration::from_secs(900);
        let mut w = open_writer(
            path.clone(),
            "h".into(),
            Some(seal_settings(dir.path(), 10_000)),
            t0,
        )
        .unwrap();
        assert_eq!(w.next_deadline(), None, "no line, no epoch to end");
        let t1 = t0 + Duration::from_secs(5);
        w.handle(vec![event(1)], t1);
        assert_eq!(w.next_deadline(), Some(t1 + every));
        w.on_timer(t1 + every - Duration::from_secs(1));
        assert_eq!(shape(&path), [ev(0)]);
        w.on_timer(t1 + every);
        assert_eq!(shape(&path), [ev(0), end(0, "time")]);
        assert_eq!(state_epoch(dir.path()), 1);
        assert_eq!(w.next_deadline(), None);
        w.handle(vec![event(2)], t1 + every * 3);
        assert_eq!(w.next_deadline(), Some(t1 + every * 4));
    }

    #[test]
    fn a_held_back_checkpoint_is_logged_by_the_timer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let t0 = Instant::now();
        let mut w = open_writer(path, "h".into(), None, t0).unwrap();
        assert_eq!(w.logged.map(|(seq, _)| seq), Some(0), "logged at start");
        w.handle(vec![event(1)], t0);
        assert_eq!(w.logged.map(|(seq, _)| seq), Some(0), "held back");
        assert_eq!(w.next_deadline(), Some(t0 + checkpoint::LOG_EVERY));
        w.on_timer(t0 + checkpoint::LOG_EVERY);
        assert_eq!(w.logged.map(|(seq, _)| seq), Some(1));
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn restarts_and_crashes_at_each_step_continue_a_verifiable_sealed_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let state_file = dir.path().join("state").join(keyfile::STATE_FILE);
        let open = || {
            open_writer(
                path.clone(),
                "h".into(),
                Some(seal_settings(dir.path(), 10_000)),
                Instant::now(),
            )
        };
        // Killed mid-epoch: the next start ends that epoch with the key on disk.
        let mut w = open().unwrap();
        w.handle(vec![event(1), event(2)], Instant::now());
        drop(w);
        let state_at_1 = {
            let mut w = open().unwrap();
            let saved = fs::read(&state_file).unwrap();
            w.handle(vec![event(3), Msg::Stop(mpsc::channel().0)], Instant::now());
            saved
        };
        // Stopped: the epoch ended and the next key is saved; the next start writes on in it.
        let mut w = open().unwrap();
        let state_at_2 = fs::read(&state_file).unwrap();
        w.handle(vec![event(4), Msg::Stop(mpsc::channel().0)], Instant::now());
        drop(w);
        // Killed between the end line and the state update: the state still names epoch 2.
        fs::write(&state_file, &state_at_2).unwrap();
        let mut w = open().unwrap();
        assert_eq!(state_epoch(dir.path()), 3);
        w.handle(vec![event(5)], Instant::now());
        drop(w);
        // A state from a backup, behind the file: caught up, never sealing with an older key.
        fs::write(&state_file, &state_at_1).unwrap();
        let mut w = open().unwrap();
        w.handle(vec![event(6)], Instant::now());
        drop(w);
        assert_eq!(
            shape(&path),
            [
                ev(0),
                ev(0),
                end(0, "restart"),
                ev(1),
                end(1, "stop"),
                ev(2),
                end(2, "stop"),
                ev(3),
                end(3, "restart"),
                ev(4),
            ]
        );
        assert_eq!(state_epoch(dir.path()), 4);
        let text = fs::read_to_string(&path).unwrap();
        let report = check_sealed(&text, verification_key(dir.path())).unwrap();
        assert_eq!((report.sealed, report.last_epoch), (10, 4));

        // Without the state, a sealed file is not sealed on with a new key.
        fs::remove_file(&state_file).unwrap();
        let err = open().err().unwrap().to_string();
        assert!(err.contains("no sealing state"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), text, "nothing written");
    }

    #[test]
    fn rotation_ends_the_epoch_in_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let rotated = dir.path().join("audit.log.1");
        let t0 = Instant::now();
        let mut w = open_writer(
            path.clone(),
            "h".into(),
            Some(seal_settings(dir.path(), 10_000)),
            t0,
        )
        .unwrap();
        w.handle(vec![event(1), event(2)], t0);
        fs::rename(&path, &rotated).unwrap();
        w.handle(vec![Msg::Reopen, event(3)], t0);
        assert_eq!(shape(&rotated), [ev(0), ev(0), end(0, "rotate")]);
        assert_eq!(shape(&path), [ev(1)]);
        let key = || verification_key(dir.path());
        let old = fs::read_to_string(&rotated).unwrap();
        let new = fs::read_to_string(&path).unwrap();
        assert!(!check_sealed(&old, key()).unwrap().open);
        assert_eq!(check_sealed(&new, key()).unwrap().first_epoch, 1);
        check_sealed(&(old + &new), key()).unwrap();
    }

    #[test]
    fn after_close_the_key_on_disk_cannot_reseal_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (sink, layer) =
            AuditSink::open(&path, "h".into(), Some(seal_settings(dir.path(), 10_000))).unwrap();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::info!(target: "audit", event = "token.issued", uid = 7u64, "one");
            tracing::info!(target: "audit", event = "token.issued", uid = 8u64, "two");
        });
        sink.close();
        assert_eq!(
            shape(&path),
            [ev(0), ev(0), end(0, "stop")],
            "the line of close() is the last"
        );
        // Someone who reads the key left on disk (epoch 1) and edits line 2.
        let stolen = keyfile::read_state(&dir.path().join("state"))
            .unwrap()
            .unwrap();
        assert_eq!(stolen.epoch, 1);
        let text = fs::read_to_string(&path).unwrap();
        let edited: Vec<String> = text
            .lines()
            .map(|l| l.replace("\"uid\":8", "\"uid\":0"))
            .collect();
        let forged = crate::audit::seal::tests::rechain(&edited, |_| {
            Some(EpochKey {
                epoch: stolen.epoch,
                key: crate::audit::seal::Key::from_hex(&stolen.key.to_hex()).unwrap(),
                key_id: stolen.key_id.clone(),
            })
        });
        chain::verify(&forged.join("\n")).unwrap();
        let err = check_sealed(&forged.join("\n"), verification_key(dir.path())).unwrap_err();
        assert!(err.starts_with("line 2: seal does not match"), "{err}");
    }

    #[test]
    fn audit_events_are_chained_into_a_private_file_across_reopen_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.log");
        let (sink, layer) = AuditSink::open(&path, "host-1".into(), None).unwrap();
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
                queue: sink.queue.clone(),
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
        let (sink3, layer3) = AuditSink::open(&path, "host-1".into(), None).unwrap();
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
        let (sink, layer) = AuditSink::open(&path, "h".into(), None).unwrap();
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

    #[test]
    fn a_full_queue_drops_and_counts_never_blocks_and_the_gap_line_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let health = Arc::new(Health::default());
        // Not started yet: nothing takes events from the queue, as with a writer whose write
        // never returns.
        let (unstarted, layer) = AuditSink::prepare_reporting_to("h".into(), health.clone());
        let queue = unstarted.queue.clone();
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        let emit = |n: usize| {
            tracing::dispatcher::with_default(&dispatch, || {
                queued(|| tracing::info!(target: "audit", event = "token.issued", n, "x"))
            })
        };
        for n in 0..QUEUE_EVENTS {
            assert!(emit(n));
        }
        assert!(health.failing().is_none());
        // Full: the next emitter waits for room, briefly, then drops its event and is told;
        // from now on callers are told the writer is behind.
        let asked = Instant::now();
        assert!(!emit(QUEUE_EVENTS));
        let waited = asked.elapsed();
        assert!(
            waited >= QUEUE_WAIT && waited < QUEUE_WAIT * 4,
            "{waited:?}"
        );
        assert_eq!(health.failing().as_deref(), Some(health::BACKLOGGED));
        // Beyond: dropped without waiting.
        let asked = Instant::now();
        for n in 0..99 {
            assert!(!emit(n));
        }
        assert!(asked.elapsed() < QUEUE_WAIT, "{:?}", asked.elapsed());
        // An event emitted with no audit layer involved is not reported dropped.
        assert!(queued(|| tracing::info!(target: "audit", "no layer")));
        assert_eq!(queue.dropped.load(Ordering::Acquire), 100);
        assert_eq!(queue.events.load(Ordering::Acquire), QUEUE_EVENTS);
        // A reopen asked for meanwhile does not wait either.
        let (tx, _) = (unstarted.tx.clone(), ());
        AuditSink {
            tx,
            queue: queue.clone(),
        }
        .reopen();
        assert!(queue.reopen.load(Ordering::Acquire));

        // The writer starts (the write returns): it catches up, the drops are a gap line.
        let sink = unstarted.start(&path, None).unwrap();
        sink.flush();
        assert!(health.failing().is_none(), "caught up");
        assert_eq!(queue.events.load(Ordering::Acquire), 0);
        let text = fs::read_to_string(&path).unwrap();
        let v = chain::verify(&text).unwrap();
        let gaps: Vec<Map<String, Value>> = text
            .lines()
            .map(|l| serde_json::from_str::<Map<String, Value>>(l).unwrap())
            .filter(|l| l["event"] == "audit.gap")
            .collect();
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0]["lost"], 100);
        assert_eq!(v.events as usize, QUEUE_EVENTS + 1);
        sink.close();
    }

    /// A small tmpfs the test mounts (the tests run as root), unmounted when dropped.
    struct TmpFs {
        dir: tempfile::TempDir,
    }

    impl TmpFs {
        fn mount(size: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs (needs root)");
            Self { dir }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Writes a file until the filesystem is full.
        fn fill(&self) -> PathBuf {
            let filler = self.path().join("filler");
            let mut f = File::create(&filler).unwrap();
            let block = vec![b'x'; 4096];
            loop {
                match f.write(&block) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::StorageFull => break,
                    Err(e) => panic!("{e}"),
                }
            }
            filler
        }
    }

    impl Drop for TmpFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }

    /// An event bigger than the slack in a tmpfs page, so that it cannot fit a full disk.
    fn big_event(n: u64) -> Msg {
        let mut fields = Map::new();
        fields.insert("event".into(), Value::from("token.issued"));
        fields.insert("n".into(), Value::from(n));
        fields.insert("pad".into(), Value::from("p".repeat(6000)));
        Msg::Event(envelope(fields, "h", "INFO"))
    }

    fn events(path: &Path) -> Vec<(u64, String)> {
        lines(path)
            .iter()
            .map(|l| {
                (
                    l["seq"].as_u64().unwrap(),
                    l["event"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn a_torn_last_line_is_cut_off_at_start_and_recorded_in_the_sealed_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let seal = || Some(seal_settings(dir.path(), 10_000));
        let (sink, layer) = AuditSink::open(&path, "h".into(), seal()).unwrap();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::info!(target: "audit", event = "token.issued", uid = 7u64, "one");
            tracing::info!(target: "audit", event = "token.issued", uid = 8u64, "two");
        });
        sink.flush();
        // Killed mid-write: half of a third line (the writer stops without a word).
        drop(sink);
        let whole = fs::read_to_string(&path).unwrap();
        let half = &whole.lines().next().unwrap()[..40];
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(half.as_bytes())
            .unwrap();
        assert!(chain::verify(&fs::read_to_string(&path).unwrap()).is_err());

        let (sink, _layer) = AuditSink::open(&path, "h".into(), seal()).unwrap();
        sink.close();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&whole),
            "the whole lines stay as they were"
        );
        let v = chain::verify(&text).unwrap();
        check_sealed(&text, verification_key(dir.path())).unwrap();
        assert_eq!(
            events(&path),
            [
                (1, "token.issued".into()),
                (2, "token.issued".into()),
                (3, "audit.epoch_end".into()),
                (4, "audit.truncated".into()),
                (5, "audit.epoch_end".into()),
            ]
        );
        let truncated = &lines(&path)[3];
        assert_eq!(truncated["bytes"], 40);
        assert_eq!(truncated["offset"], whole.len());
        assert_eq!(
            truncated["sha256"],
            hex::encode(Sha256::digest(half.as_bytes()))
        );
        assert_eq!(v.head.seq, 5);

        // A whole last line that is not JSON (garbage after a power loss) goes too; a whole
        // JSON line that does not chain stays for `audit verify` to report.
        let before = fs::read_to_string(&path).unwrap();
        fs::write(&path, before.clone() + "\0\0\0\0\n").unwrap();
        drop(AuditSink::open(&path, "h".into(), seal()).unwrap());
        let Opened { torn, .. } = open_file(&path).unwrap();
        assert_eq!(torn, None, "the garbage was cut at the previous open");
        let mut text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"bytes\":5"), "{text}");
        chain::verify(&text).unwrap();
        text.push_str("{\"event\":\"forged\",\"seq\":99,\"hash\":\"00\"}\n");
        fs::write(&path, &text).unwrap();
        let Opened { torn, .. } = open_file(&path).unwrap();
        assert_eq!(torn, None);
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn a_full_filesystem_leaves_no_half_line_and_the_chain_resumes_with_a_gap_line() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let fs_ = TmpFs::mount("64k");
        let path = fs_.path().join("audit.log");
        let health = Arc::new(Health::default());
        let t0 = Instant::now();
        let mut w = Writer::open(path.clone(), "h".into(), None, health.clone(), t0).unwrap();
        w.handle(vec![event(1)], t0);
        let good = fs::read_to_string(&path).unwrap();
        let filler = fs_.fill();

        w.handle(vec![big_event(2), big_event(3), event(4)], t0);
        let why = health.failing().expect("failing while full");
        assert!(why.contains("No space left"), "{why}");
        assert_eq!(fs::read_to_string(&path).unwrap(), good, "no half line");
        assert_eq!((w.lost, w.written.seq), (3, 1));
        assert_eq!(
            w.head, w.written,
            "the chain is back at the last line written"
        );
        assert!(w.next_deadline() <= w.retry_at, "the timer retries");
        // Still full, but the small gap line fits the file's last page once the half line is
        // cut: the timer's retry writes it, and the next big event fails again.
        w.on_timer(w.retry_at.unwrap());
        assert_eq!((w.lost, health.failing()), (0, None));
        let with_gap = fs::read_to_string(&path).unwrap();
        w.handle(vec![big_event(5)], t0);
        assert_eq!(w.lost, 1);
        assert!(health.failing().is_some());
        assert_eq!(fs::read_to_string(&path).unwrap(), with_gap, "no half line");

        // Space is back: the writer's next try writes the gap line, unprompted.
        fs::remove_file(filler).unwrap();
        let at = w.retry_at.unwrap();
        w.on_timer(at);
        assert_eq!(health.failing(), None);
        assert_eq!(w.retry_at, None);
        w.handle(vec![event(6)], at);
        assert_eq!(
            events(&path),
            [
                (1, "token.issued".into()),
                (2, "audit.gap".into()),
                (3, "audit.gap".into()),
                (4, "token.issued".into())
            ]
        );
        assert_eq!(
            (&lines(&path)[1]["lost"], &lines(&path)[2]["lost"]),
            (&3.into(), &1.into())
        );
        assert_eq!(lines(&path)[3]["n"], 6);
        let v = chain::verify(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!((v.events, v.from_genesis), (4, true));
        let text = metrics.render();
        let lost = format!("{} 4", crate::metrics::AUDIT_EVENTS_LOST);
        assert!(text.lines().any(|l| l == lost), "{lost} not in\n{text}");
        let healthy = format!("{} 1", crate::metrics::AUDIT_HEALTHY);
        assert!(
            text.lines().any(|l| l == healthy),
            "{healthy} not in\n{text}"
        );
    }

    #[test]
    fn a_file_deleted_while_open_is_recreated_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let t0 = Instant::now();
        let mut w = open_writer(path.clone(), "h".into(), None, t0).unwrap();
        w.handle(vec![event(1), event(2)], t0);
        let old = chain::verify(&fs::read_to_string(&path).unwrap()).unwrap();
        fs::remove_file(&path).unwrap();
        w.handle(vec![event(3)], t0);
        assert_eq!(
            events(&path),
            [(3, "audit.file_deleted".into()), (4, "token.issued".into())]
        );
        assert_eq!(lines(&path)[0]["last_seq"], 2);
        assert_eq!(lines(&path)[0]["prev"], old.head.hash.as_str());
        let v = chain::verify(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!((v.first_seq, v.from_genesis), (3, false));
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }
}
