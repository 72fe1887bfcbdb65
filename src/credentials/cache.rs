//! The per-app credential cache: one entry per AssumeRole input. It serves credentials while
//! they have more than `min_remaining` left, refreshes them in the background at a jittered point
//! before that, makes every concurrent caller of a cold or stale entry wait on one STS call, and
//! retries transient STS failures with backoff while serving the last good credentials (degraded
//! mode) down to [`DEGRADED_MIN_REMAINING`].
//!
//! Each entry has at most one *worker* task: it draws from the STS [budget](StsBudget), calls
//! STS, and on a transient failure sleeps (backoff) and tries again for as long as the entry is
//! in use. Callers never wait for a retry: they wait for the attempt in flight, if any, for at
//! most `max_wait` (the attempt goes on without them), and otherwise get the last good
//! credentials or the last error at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::budget::StsBudget;
use super::schedule::{self, Phase};
use super::{AssumeRoleInput, CredentialSource, Credentials, StsError, refresh, retry};
use crate::config::{CredentialPolicy, DEFAULT_STS_BURST, DEFAULT_STS_CALLS_PER_SECOND};
use crate::shutdown::Tasks;
use crate::time::BootTime;

/// While STS is failing, the last good credentials are served until they have this little left
/// (EC2 itself rotates "at least five minutes before the expiration"); after that, a 5xx.
pub const DEGRADED_MIN_REMAINING: Duration = Duration::from_secs(5 * 60);
/// After a transient failure that is no longer being retried (the entry went idle), callers get
/// that failure for this long before one of them starts a new attempt.
pub const FAILURE_HOLD: Duration = Duration::from_secs(2);
/// After a refusal (AccessDenied, MalformedPolicyDocument, unusable answer), callers get the
/// refusal for this long before one of them tries again: refusals are never retried in a loop.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(60);
pub use crate::config::STS_ATTEMPT_TIMEOUT;
/// Degraded serving is logged at most this often per entry.
const DEGRADED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Wall-clock time, injectable so tests can move it; and the boot clock, for the intervals the
/// daemon measures itself (see `crate::time`), which tests move with it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
    fn boot_time(&self) -> BootTime {
        BootTime::now()
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Sts(#[from] StsError),
    #[error("credentials refresh task failed")]
    TaskFailed,
    /// `[audit] on_failure = "refuse"` and the audit file cannot be written: nothing is issued
    /// that cannot be recorded.
    #[error("not issued: the audit file cannot be written ({0})")]
    AuditUnavailable(String),
    /// The AssumeRole call in flight did not answer within `credentials.max_wait`. The call
    /// goes on, so the caller's next try gets its result.
    #[error(
        "STS has not answered within {}ms; the call goes on and its result is cached",
        .0.as_millis()
    )]
    Pending(Duration),
}

impl CacheError {
    /// Whether it may pass (STS throttling, timeouts, 5xx; an audit file that recovers):
    /// callers get 503, not 500.
    pub fn is_transient(&self) -> bool {
        match self {
            CacheError::Sts(e) => e.is_transient(),
            CacheError::AuditUnavailable(_) | CacheError::Pending(_) => true,
            CacheError::TaskFailed => false,
        }
    }
}

/// Counters for the metrics endpoint (and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    /// Entries whose STS calls are failing transiently while they hold last good credentials.
    pub degraded_entries: usize,
    /// Requests answered with last good credentials below `min_remaining`.
    pub degraded_serves: u64,
}

/// One entry as `peek` shows it.
#[derive(Debug, Clone)]
pub struct EntryStatus {
    /// The credentials served now, if any (they may be below `min_remaining` while degraded).
    pub current: Option<Arc<Credentials>>,
    pub refresh_at: Option<SystemTime>,
    /// The last STS failure, until the next success.
    pub last_error: Option<String>,
}

pub(crate) type Outcome = Result<Arc<Credentials>, CacheError>;
type Attempt = Shared<BoxFuture<'static, Outcome>>;

/// A cheap handle; clones share one cache.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    source: Arc<dyn CredentialSource>,
    pub(super) clock: Arc<dyn Clock>,
    policy: Mutex<CredentialPolicy>,
    budget: StsBudget,
    /// Keys come from the config, not from callers, so a fast hash is safe here; every
    /// credential request hashes one (role ARN, session name, tags, policy text).
    entries: Mutex<HashMap<AssumeRoleInput, Arc<Entry>, foldhash::fast::RandomState>>,
    /// Wakes the refresher when a schedule changed.
    pub(super) wake: Notify,
    /// The refresher and the STS workers: cancelled and waited for by [`CredentialCache::shutdown`]
    /// or by a node above (the daemon's shutdown tree).
    tasks: Tasks,
    /// `tasks`' token: the refresher's, and the parent of every entry's.
    pub(super) stop: CancellationToken,
    degraded_serves: AtomicU64,
    /// An AssumeRole has succeeded since start: the daemon's source works (for readiness).
    obtained: AtomicBool,
}

pub(super) struct Entry {
    state: Mutex<EntryState>,
    /// Cancelled when the entry is dropped (reload) or the cache shuts down.
    cancel: CancellationToken,
}

#[derive(Default)]
pub(super) struct EntryState {
    current: Option<Arc<Credentials>>,
    /// When the next background refresh starts; `None` after a refusal.
    refresh_at: Option<SystemTime>,
    /// The last request (or the prefetch); entries unused for `idle_after` (of real time: a
    /// wall-clock step must not make every app idle at once) are not refreshed.
    last_used: Option<BootTime>,
    /// A worker task is running for this entry (calling STS or waiting to retry).
    worker: bool,
    /// The STS call in flight, shared by every caller that waits for it.
    attempt: Option<Attempt>,
    /// The last failure, until the next success.
    failure: Option<Failure>,
    degraded_logged_at: Option<Instant>,
    /// When the spread first fetch of a prefetch app starts (tokio's clock); cleared, and the
    /// schedule void, once any fetch of the entry starts.
    prefetch_at: Option<Instant>,
}

struct Failure {
    error: CacheError,
    at: Instant,
    hold: Duration,
}

impl Failure {
    fn held(&self) -> bool {
        self.at.elapsed() < self.hold
    }
}

impl Entry {
    fn lock(&self) -> MutexGuard<'_, EntryState> {
        self.state.lock().expect("cache entry lock poisoned")
    }
}

impl EntryState {
    fn is_active(&self, now: BootTime, idle_after: Duration) -> bool {
        self.idle_in(now, idle_after).is_some()
    }

    /// How long until the entry turns idle; `None` if it is (or was never used).
    fn idle_in(&self, now: BootTime, idle_after: Duration) -> Option<Duration> {
        let used = self.last_used?;
        let unused = now.since(used).unwrap_or(Duration::MAX);
        idle_after.checked_sub(unused).filter(|d| !d.is_zero())
    }

    fn held(&self) -> bool {
        self.failure.as_ref().is_some_and(Failure::held)
    }

    fn refresh_due(&self, now: SystemTime) -> bool {
        self.refresh_at.is_some_and(|at| at <= now) && !self.worker && !self.held()
    }
}

impl CredentialCache {
    /// A cache with the default STS budget.
    pub fn new(
        source: Arc<dyn CredentialSource>,
        clock: Arc<dyn Clock>,
        policy: CredentialPolicy,
    ) -> Self {
        let budget = StsBudget::new(
            DEFAULT_STS_CALLS_PER_SECOND,
            DEFAULT_STS_BURST,
            Default::default(),
        );
        Self::with_budget(source, clock, policy, budget)
    }

    pub fn with_budget(
        source: Arc<dyn CredentialSource>,
        clock: Arc<dyn Clock>,
        policy: CredentialPolicy,
        budget: StsBudget,
    ) -> Self {
        Self::under(source, clock, policy, budget, Tasks::new())
    }

    /// A cache whose refresher and STS workers run under `tasks`: cancelling it (or a node
    /// above it) stops them, and each entry's token is a child of it.
    pub fn under(
        source: Arc<dyn CredentialSource>,
        clock: Arc<dyn Clock>,
        policy: CredentialPolicy,
        budget: StsBudget,
        tasks: Tasks,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                clock,
                policy: Mutex::new(policy),
                budget,
                entries: Mutex::new(HashMap::default()),
                wake: Notify::new(),
                stop: tasks.token().clone(),
                tasks,
                degraded_serves: AtomicU64::new(0),
                obtained: AtomicBool::new(false),
            }),
        }
    }

    /// Credentials for `input`: cached ones with more than `min_remaining` left, or the result
    /// of the STS call in flight (one for all concurrent callers) if it comes within
    /// `max_wait`, or, while STS fails or is slow, the last good ones down to
    /// [`DEGRADED_MIN_REMAINING`]. A caller that stops waiting leaves the call running: it
    /// belongs to the entry's worker, so the next caller gets its result as soon as it lands.
    pub async fn get(&self, input: &AssumeRoleInput) -> Result<Arc<Credentials>, CacheError> {
        let inner = &self.inner;
        let entry = inner.entry(input);
        let (attempt, max_wait) = {
            let mut st = entry.lock();
            let now = inner.clock.now();
            let policy = inner.policy();
            st.last_used = Some(inner.clock.boot_time());
            if let Some(current) = st.current.clone()
                && current.remaining(now) > policy.min_remaining
            {
                if st.refresh_due(now) {
                    // Normally the refresher has started it already; this covers a late one.
                    drop(inner.attempt(&entry, &mut st, input));
                }
                return Ok(current);
            }
            if let Some(failure) = &st.failure
                && (st.worker || failure.held())
            {
                // STS is failing and a retry is scheduled (or the failure is held): answer now.
                let error = failure.error.clone();
                return inner.fallback(input, &mut st, now, error);
            }
            (inner.attempt(&entry, &mut st, input), policy.max_wait)
        };
        let error = match tokio::time::timeout(max_wait, attempt).await {
            Ok(Ok(creds)) => return Ok(creds),
            Ok(Err(error)) => error,
            Err(_) => CacheError::Pending(max_wait),
        };
        let mut st = entry.lock();
        inner.fallback(input, &mut st, inner.clock.now(), error)
    }

    /// Starts fetching credentials for `inputs` that have none, without waiting. A prefetched
    /// entry counts as used now, so it is kept warm for `idle_after`.
    pub fn prefetch(&self, inputs: impl IntoIterator<Item = AssumeRoleInput>) {
        let inner = &self.inner;
        for input in inputs {
            let entry = inner.entry(&input);
            let mut st = entry.lock();
            st.last_used.get_or_insert(inner.clock.boot_time());
            if st.current.is_none() && !st.worker && !st.held() {
                drop(inner.attempt(&entry, &mut st, &input));
            }
        }
    }

    /// Schedules the first fetch of each of `inputs` that has no credentials, no fetch under way
    /// and no moment yet, at a random moment of `window` from now ([`schedule::prefetch_delays`];
    /// one of them early while no AssumeRole has succeeded yet, to prove the source). An entry
    /// asked for before its moment is fetched at once and its moment is void; [`Self::retain`]
    /// and shutdown cancel the moments with the entries. A zero `window` is [`Self::prefetch`].
    pub fn prefetch_spread(
        &self,
        inputs: impl IntoIterator<Item = AssumeRoleInput>,
        window: Duration,
    ) {
        if window.is_zero() {
            return self.prefetch(inputs);
        }
        let inner = &self.inner;
        let waiting: Vec<_> = inputs
            .into_iter()
            .map(|input| {
                let entry = inner.entry(&input);
                (input, entry)
            })
            .filter(|(_, entry)| {
                let st = entry.lock();
                st.current.is_none() && !st.worker && st.prefetch_at.is_none()
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        let start = Instant::now();
        let delays = schedule::prefetch_delays(
            waiting.len(),
            window,
            !inner.obtained.load(Ordering::Relaxed),
            &mut rand::rng(),
        );
        let mut plan: Vec<_> = waiting
            .into_iter()
            .zip(delays)
            .map(|((input, entry), delay)| {
                let at = start + delay;
                entry.lock().prefetch_at = Some(at);
                (at, input, entry)
            })
            .collect();
        plan.sort_by_key(|(at, _, _)| *at);
        tracing::debug!(
            apps = plan.len(),
            window_secs = window.as_secs(),
            "prefetch spread over the start-up window"
        );
        inner
            .tasks
            .spawn("prefetch spread", spread(inner.clone(), plan));
    }

    /// How long until the first fetch of `input` starts while its spread moment is ahead, or
    /// zero while a first fetch is under way and has not failed: an entry on its way to its
    /// first credentials, with nothing wrong yet.
    pub fn prefetch_pending(&self, input: &AssumeRoleInput) -> Option<Duration> {
        let entry = self.inner.entries.lock().ok()?.get(input).cloned()?;
        let st = entry.lock();
        if let Some(at) = st.prefetch_at {
            return Some(at.saturating_duration_since(Instant::now()));
        }
        (st.current.is_none() && st.worker && st.failure.is_none()).then_some(Duration::ZERO)
    }

    /// Whether an AssumeRole has succeeded since the cache was made: the source is proven.
    pub fn source_proven(&self) -> bool {
        self.inner.obtained.load(Ordering::Relaxed)
    }

    /// Drops every cached entry whose input is not in `keep` (after a config reload), stopping
    /// its refreshes. Returns how many were dropped.
    pub fn retain(&self, keep: impl Fn(&AssumeRoleInput) -> bool) -> usize {
        let mut entries = self.inner.entries.lock().expect("cache lock poisoned");
        let before = entries.len();
        entries.retain(|input, entry| {
            let kept = keep(input);
            if !kept {
                entry.cancel.cancel();
            }
            kept
        });
        before - entries.len()
    }

    /// Applies a new policy (after a config reload). Refreshes now scheduled too late for the new
    /// `min_remaining` are moved into the new window; the others keep their (spread) schedule.
    pub fn set_policy(&self, policy: CredentialPolicy) {
        let inner = &self.inner;
        {
            let mut current = inner.policy.lock().expect("policy lock poisoned");
            if *current == policy {
                return;
            }
            *current = policy;
        }
        let now = inner.clock.now();
        for (_, entry) in inner.snapshot() {
            let mut st = entry.lock();
            let (Some(current), Some(at)) = (st.current.clone(), st.refresh_at) else {
                continue;
            };
            let latest = current
                .expiration
                .checked_sub(policy.min_remaining + schedule::REFRESH_MARGIN);
            if latest.is_none_or(|latest| at > latest) {
                st.refresh_at = Some(schedule::refresh_at(
                    now,
                    current.expiration,
                    &policy,
                    Phase::Renewal,
                    &mut rand::rng(),
                ));
            }
        }
        inner.wake.notify_one();
    }

    /// The global AssumeRole budget, e.g. to apply a reloaded rate.
    pub fn budget(&self) -> &StsBudget {
        &self.inner.budget
    }

    /// When the next background refresh of `input` starts, if one is scheduled.
    pub fn next_refresh(&self, input: &AssumeRoleInput) -> Option<SystemTime> {
        let entry = self.inner.entries.lock().ok()?.get(input).cloned()?;
        entry.lock().refresh_at
    }

    /// What the cache holds for `input`, without starting anything: for status and readiness.
    pub fn peek(&self, input: &AssumeRoleInput) -> Option<EntryStatus> {
        let entry = self.inner.entries.lock().ok()?.get(input).cloned()?;
        let st = entry.lock();
        Some(EntryStatus {
            current: st.current.clone(),
            refresh_at: st.refresh_at,
            last_error: st.failure.as_ref().map(|f| f.error.to_string()),
        })
    }

    pub fn stats(&self) -> CacheStats {
        let inner = &self.inner;
        let entries = inner.snapshot();
        let degraded_entries = entries
            .iter()
            .filter(|(_, e)| {
                let st = e.lock();
                st.current.is_some() && st.failure.as_ref().is_some_and(|f| f.error.is_transient())
            })
            .count();
        CacheStats {
            entries: entries.len(),
            degraded_entries,
            degraded_serves: inner.degraded_serves.load(Ordering::Relaxed),
        }
    }

    /// Starts the background refresher (see the `refresh` module) until [`Self::shutdown`].
    pub fn start_refresher(&self) {
        let inner = self.inner.clone();
        self.inner
            .tasks
            .spawn("credential refresher", refresh::run(inner));
    }

    /// Stops the refresher and every STS worker, and waits for them to end.
    pub async fn shutdown(&self) {
        self.inner.tasks.stop().await;
    }
}

impl Inner {
    pub(super) fn policy(&self) -> CredentialPolicy {
        *self.policy.lock().expect("policy lock poisoned")
    }

    fn entry(&self, input: &AssumeRoleInput) -> Arc<Entry> {
        let mut entries = self.entries.lock().expect("cache lock poisoned");
        if let Some(e) = entries.get(input) {
            return e.clone();
        }
        entries
            .entry(input.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    state: Mutex::default(),
                    cancel: self.stop.child_token(),
                })
            })
            .clone()
    }

    pub(super) fn snapshot(&self) -> Vec<(AssumeRoleInput, Arc<Entry>)> {
        self.entries
            .lock()
            .expect("cache lock poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The STS call in flight for this entry, starting a worker if none is running.
    fn attempt(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        st: &mut EntryState,
        input: &AssumeRoleInput,
    ) -> Attempt {
        if let Some(attempt) = &st.attempt {
            return attempt.clone();
        }
        if st.worker || entry.cancel.is_cancelled() {
            // A worker between attempts answers through `failure`; a dropped entry has none.
            return futures_util::future::ready(Err(CacheError::TaskFailed))
                .boxed()
                .shared();
        }
        st.worker = true;
        // Asked for before its spread moment (or at it): the moment has nothing left to do.
        st.prefetch_at = None;
        let (tx, attempt) = new_attempt(st);
        self.tasks.spawn(
            "sts worker",
            worker(self.clone(), entry.clone(), input.clone(), tx),
        );
        attempt
    }

    /// What a caller gets when no fresh credentials are available: the last good ones while the
    /// failure is transient and they have more than [`DEGRADED_MIN_REMAINING`] left, the error
    /// otherwise. Expired or empty credentials are never returned.
    fn fallback(
        &self,
        input: &AssumeRoleInput,
        st: &mut EntryState,
        now: SystemTime,
        error: CacheError,
    ) -> Result<Arc<Credentials>, CacheError> {
        let Some(current) = st.current.clone() else {
            return Err(error);
        };
        let left = current.remaining(now);
        if left > self.policy().min_remaining {
            // A refresh failed but these are still good in normal operation.
            return Ok(current);
        }
        if !error.is_transient() || left <= DEGRADED_MIN_REMAINING {
            return Err(error);
        }
        self.degraded_serves.fetch_add(1, Ordering::Relaxed);
        if st
            .degraded_logged_at
            .is_none_or(|at| at.elapsed() >= DEGRADED_LOG_EVERY)
        {
            st.degraded_logged_at = Some(Instant::now());
            tracing::warn!(
                role = %input.role_arn,
                session = %input.session_name,
                access_key_id = %current.access_key_id,
                remaining_secs = left.as_secs(),
                error = %error,
                "serving last good credentials: STS failing"
            );
        }
        Ok(current)
    }
}

/// `CredentialPolicy` has no `PartialEq`; destructured so a new field cannot be missed here.
fn new_attempt(st: &mut EntryState) -> (oneshot::Sender<Outcome>, Attempt) {
    let (tx, rx) = oneshot::channel();
    let attempt = rx
        .map(|r| r.unwrap_or(Err(CacheError::TaskFailed)))
        .boxed()
        .shared();
    st.attempt = Some(attempt.clone());
    (tx, attempt)
}

/// The one task that talks to STS for an entry: calls, and on a transient failure waits
/// (backoff) and calls again while the entry is in use, until a success, a refusal, or the
/// entry is dropped.
async fn worker(
    inner: Arc<Inner>,
    entry: Arc<Entry>,
    input: AssumeRoleInput,
    mut tx: oneshot::Sender<Outcome>,
) {
    let cold = entry.lock().current.is_none();
    let mut failures = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = entry.cancel.cancelled() => break,
            _ = inner.budget.acquire() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            biased;
            _ = entry.cancel.cancelled() => break,
            r = tokio::time::timeout(STS_ATTEMPT_TIMEOUT, inner.source.assume_role(input.clone())) => r,
        };
        let result = match result {
            Ok(result) => result.map_err(CacheError::from),
            Err(_) => Err(StsError::Unavailable(format!(
                "no answer within {}s",
                STS_ATTEMPT_TIMEOUT.as_secs()
            ))
            .into()),
        };
        let now = inner.clock.now();
        let policy = inner.policy();
        let result = result.and_then(|creds| usable(creds, now, policy.min_remaining));
        super::audit::sts_call(&input, &result, started.elapsed());
        let retry_in = {
            let mut st = entry.lock();
            st.attempt = None;
            match &result {
                Ok(creds) => {
                    let at = schedule::refresh_at(
                        now,
                        creds.expiration,
                        &policy,
                        Phase::of_fetch(cold, failures),
                        &mut rand::rng(),
                    );
                    st.current = Some(creds.clone());
                    st.refresh_at = Some(at);
                    inner.obtained.store(true, Ordering::Relaxed);
                    st.failure = None;
                    st.degraded_logged_at = None;
                    st.worker = false;
                    log_success(&input, creds, failures, at.duration_since(now));
                    None
                }
                Err(error) => {
                    failures += 1;
                    let transient = error.is_transient();
                    let retry = transient
                        && st.is_active(inner.clock.boot_time(), policy.idle_after)
                        && !entry.cancel.is_cancelled();
                    st.failure = Some(Failure {
                        error: error.clone(),
                        at: Instant::now(),
                        hold: if transient {
                            FAILURE_HOLD
                        } else {
                            REFUSAL_HOLD
                        },
                    });
                    if !transient {
                        st.refresh_at = None;
                    }
                    let delay = retry.then(|| retry::backoff(failures, &mut rand::rng()));
                    st.worker = delay.is_some();
                    log_failure(&input, error, failures, delay);
                    delay
                }
            }
        };
        // Nobody waiting is fine.
        let _ = tx.send(result);
        inner.wake.notify_one();
        let Some(delay) = retry_in else { return };
        tokio::select! {
            biased;
            _ = entry.cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
        tx = new_attempt(&mut entry.lock()).0;
    }
    // Dropped or shutting down: waiters get `TaskFailed` from the dropped sender.
    let mut st = entry.lock();
    st.worker = false;
    st.attempt = None;
}

/// Starts each planned first fetch at its moment, unless the entry was asked for meanwhile
/// (the moment is void), dropped by a reload, or the cache is shutting down.
async fn spread(inner: Arc<Inner>, plan: Vec<(Instant, AssumeRoleInput, Arc<Entry>)>) {
    for (at, input, entry) in plan {
        tokio::select! {
            biased;
            _ = inner.stop.cancelled() => return,
            _ = entry.cancel.cancelled() => continue,
            _ = tokio::time::sleep_until(at) => {}
        }
        let mut st = entry.lock();
        if st.prefetch_at != Some(at) {
            continue;
        }
        st.prefetch_at = None;
        // Kept warm for `idle_after` from its first fetch, as an unspread prefetch is.
        st.last_used.get_or_insert(inner.clock.boot_time());
        if st.current.is_none() && !st.worker && !st.held() {
            drop(inner.attempt(&entry, &mut st, &input));
        }
    }
}

fn log_success(
    input: &AssumeRoleInput,
    creds: &Credentials,
    failures: u32,
    refresh_in: Result<Duration, std::time::SystemTimeError>,
) {
    let refresh_in_secs = refresh_in.unwrap_or_default().as_secs();
    if failures > 0 {
        tracing::info!(
            role = %input.role_arn,
            session = %input.session_name,
            access_key_id = %creds.access_key_id,
            failed_attempts = failures,
            refresh_in_secs,
            "STS recovered: fresh credentials"
        );
    } else {
        tracing::debug!(
            role = %input.role_arn,
            session = %input.session_name,
            access_key_id = %creds.access_key_id,
            refresh_in_secs,
            "credentials obtained"
        );
    }
}

fn log_failure(
    input: &AssumeRoleInput,
    error: &CacheError,
    failures: u32,
    retry: Option<Duration>,
) {
    match retry {
        Some(delay) => tracing::warn!(
            role = %input.role_arn,
            session = %input.session_name,
            error = %error,
            failed_attempts = failures,
            retry_in_ms = delay.as_millis() as u64,
            "AssumeRole failed; retrying"
        ),
        None if error.is_transient() => tracing::warn!(
            role = %input.role_arn,
            session = %input.session_name,
            error = %error,
            failed_attempts = failures,
            "AssumeRole failed; not retrying an entry nobody uses"
        ),
        None => tracing::error!(
            role = %input.role_arn,
            session = %input.session_name,
            error = %error,
            "AssumeRole refused; not retrying"
        ),
    }
}

/// Refuses credentials that could never be served: empty fields, or too little left.
fn usable(
    creds: Credentials,
    now: SystemTime,
    min_remaining: Duration,
) -> Result<Arc<Credentials>, CacheError> {
    if creds.access_key_id.is_empty()
        || creds.secret_access_key.expose().is_empty()
        || creds.session_token.expose().is_empty()
    {
        return Err(StsError::Unusable("empty credential field".into()).into());
    }
    let left = creds.remaining(now);
    if left <= min_remaining {
        return Err(StsError::Unusable(format!(
            "session has {}s left, less than min_remaining {}s",
            left.as_secs(),
            min_remaining.as_secs()
        ))
        .into());
    }
    Ok(Arc::new(creds))
}

/// What the refresher needs to see of an entry.
pub(super) struct EntryView {
    pub active: bool,
    pub worker: bool,
    pub refresh_due_at: Option<SystemTime>,
    pub held: bool,
    /// Until when the entry can serve anything at all (degraded included).
    pub servable_until: Option<SystemTime>,
    /// How long until an active entry turns idle.
    pub idle_in: Option<Duration>,
    /// A spread first fetch is scheduled: not idle, only not yet asked for.
    pub prefetch_pending: bool,
}

impl Entry {
    pub(super) fn view(&self, boot: BootTime, policy: &CredentialPolicy) -> EntryView {
        let st = self.lock();
        let idle_in = st.idle_in(boot, policy.idle_after);
        EntryView {
            active: idle_in.is_some(),
            worker: st.worker,
            refresh_due_at: st.refresh_at,
            held: st.held(),
            servable_until: st
                .current
                .as_ref()
                .and_then(|c| c.expiration.checked_sub(DEGRADED_MIN_REMAINING)),
            idle_in,
            prefetch_pending: st.prefetch_at.is_some(),
        }
    }
}

impl Inner {
    /// Starts the scheduled refresh of `entry` if it is still due (checked under its lock).
    pub(super) fn refresh_if_due(self: &Arc<Self>, input: &AssumeRoleInput, entry: &Arc<Entry>) {
        let now = self.clock.now();
        let idle_after = self.policy().idle_after;
        let mut st = entry.lock();
        if st.refresh_due(now) && st.is_active(self.clock.boot_time(), idle_after) {
            drop(self.attempt(entry, &mut st, input));
        }
    }

    /// Removes `entry` if it is still the one cached for `input` and still unusable and idle.
    pub(super) fn evict_if_dead(&self, input: &AssumeRoleInput, entry: &Arc<Entry>) -> bool {
        let mut entries = self.entries.lock().expect("cache lock poisoned");
        if !entries.get(input).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            return false;
        }
        let now = self.clock.now();
        let view = entry.view(self.clock.boot_time(), &self.policy());
        let dead = !view.active
            && !view.worker
            && !view.prefetch_pending
            && view.servable_until.is_none_or(|t| t <= now);
        if dead {
            entries.remove(input);
            entry.cancel.cancel();
        }
        dead
    }
}
