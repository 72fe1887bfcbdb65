//! Whether the audit file is being written: the writer thread marks it failing when a write
//! or fsync fails and healthy again when a later write succeeds, and the audit layer marks it
//! backlogged when the writer's queue is full (a write that blocks: a frozen or hung
//! filesystem) until the writer has caught up; the request path and `/readyz` read it (see
//! `[audit] on_failure`). One per process (one daemon per process), as
//! for [`super::checkpoint`]; tests of the writer give it one of their own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

#[derive(Debug, Default)]
pub struct Health {
    failing: AtomicBool,
    /// Why, while failing.
    reason: Mutex<Option<String>>,
    /// The writer's queue was full, and the writer has not caught up since.
    backlogged: AtomicBool,
}

/// Why events cannot be recorded while the queue is full.
pub const BACKLOGGED: &str =
    "the audit writer's queue is full: its writes are blocked or far behind";

impl Health {
    /// Why the audit file is not being written, or `None` when the last write succeeded.
    pub fn failing(&self) -> Option<String> {
        if !self.failing.load(Ordering::Acquire) {
            return self
                .backlogged
                .load(Ordering::Acquire)
                .then(|| BACKLOGGED.to_owned());
        }
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the writer's queue filled and it has not caught up since.
    pub fn backlogged(&self) -> bool {
        self.backlogged.load(Ordering::Acquire)
    }

    /// The queue is full (`true`, by the layer) or the writer caught up (`false`).
    pub fn set_backlogged(&self, backlogged: bool) {
        if self.backlogged.swap(backlogged, Ordering::AcqRel) != backlogged {
            if backlogged {
                tracing::error!(
                    "{BACKLOGGED}: audit events are dropped (counted) until it catches up"
                );
            } else {
                tracing::warn!("the audit writer caught up with its queue");
            }
        }
    }

    /// The writer could not write or sync the file.
    pub fn fail(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.failing.store(true, Ordering::Release);
        metrics::gauge!(crate::metrics::AUDIT_HEALTHY).set(0.0);
    }

    /// A write succeeded.
    pub fn recover(&self) {
        self.failing.store(false, Ordering::Release);
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = None;
        metrics::gauge!(crate::metrics::AUDIT_HEALTHY).set(1.0);
    }
}

static PROCESS: LazyLock<Arc<Health>> = LazyLock::new(Arc::default);

/// This process's audit file health (the daemon's writer reports here).
pub fn process() -> Arc<Health> {
    PROCESS.clone()
}

/// Why this process's audit file is not being written, if it is not.
pub fn failing() -> Option<String> {
    PROCESS.failing()
}
