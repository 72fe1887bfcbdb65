//! The per-app credential cache: serves cached credentials while they have more than
//! `min_remaining` left, starts a refresh in the background `REFRESH_LEAD` before that point, and
//! makes every concurrent caller of a cold or stale entry wait on one shared STS call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::time::Instant;

use super::{AssumeRoleInput, CredentialSource, Credentials, StsError};
use crate::config::CredentialPolicy;

/// How long before `min_remaining` is reached a background refresh starts.
pub const REFRESH_LEAD: Duration = Duration::from_secs(10 * 60);
/// After a failed STS call, callers get that failure for this long instead of a new call each,
/// so a broken STS is not hammered at request rate.
pub const FAILURE_HOLD: Duration = Duration::from_secs(2);

/// Wall-clock time, injectable so tests can move it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
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
}

type Fetch = Shared<BoxFuture<'static, Result<Arc<Credentials>, CacheError>>>;

#[derive(Default)]
struct Entry {
    state: Mutex<EntryState>,
}

#[derive(Default)]
struct EntryState {
    current: Option<Arc<Credentials>>,
    inflight: Option<Fetch>,
    last_failure: Option<(Instant, CacheError)>,
}

pub struct CredentialCache {
    source: Arc<dyn CredentialSource>,
    clock: Arc<dyn Clock>,
    policy: CredentialPolicy,
    entries: Mutex<HashMap<AssumeRoleInput, Arc<Entry>>>,
}

impl CredentialCache {
    pub fn new(
        source: Arc<dyn CredentialSource>,
        clock: Arc<dyn Clock>,
        policy: CredentialPolicy,
    ) -> Self {
        Self {
            source,
            clock,
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Credentials for `input` with more than `min_remaining` left, from the cache or from one
    /// STS call shared with every concurrent caller.
    pub async fn get(&self, input: &AssumeRoleInput) -> Result<Arc<Credentials>, CacheError> {
        let entry = self.entry(input);
        let fetch = {
            let mut state = entry.state.lock().expect("cache lock poisoned");
            let now = self.clock.now();
            if let Some(current) = &state.current {
                let left = current.remaining(now);
                if left > self.policy.min_remaining {
                    let current = current.clone();
                    if left <= self.policy.min_remaining + REFRESH_LEAD && !recently_failed(&state)
                    {
                        // Good enough to serve now; renew in the background so nobody waits.
                        drop(self.start_fetch(&entry, &mut state, input));
                    }
                    return Ok(current);
                }
            }
            if let Some((_, err)) = state
                .last_failure
                .as_ref()
                .filter(|_| state.inflight.is_none() && recently_failed(&state))
            {
                return Err(err.clone());
            }
            self.start_fetch(&entry, &mut state, input)
        };
        fetch.await
    }

    /// Drops every cached entry whose input is not in `keep` (after a config reload).
    pub fn retain(&self, keep: impl Fn(&AssumeRoleInput) -> bool) {
        self.entries
            .lock()
            .expect("cache lock poisoned")
            .retain(|input, _| keep(input));
    }

    fn entry(&self, input: &AssumeRoleInput) -> Arc<Entry> {
        let mut entries = self.entries.lock().expect("cache lock poisoned");
        if let Some(e) = entries.get(input) {
            return e.clone();
        }
        entries.entry(input.clone()).or_default().clone()
    }

    /// Returns the in-flight STS call for this entry, starting one if there is none. The call
    /// runs as its own task, so a client that disconnects does not cancel it for the others.
    fn start_fetch(
        &self,
        entry: &Arc<Entry>,
        state: &mut EntryState,
        input: &AssumeRoleInput,
    ) -> Fetch {
        if let Some(f) = &state.inflight {
            return f.clone();
        }
        let call = self.source.assume_role(input.clone());
        let entry_for_task = entry.clone();
        let clock = self.clock.clone();
        let min_remaining = self.policy.min_remaining;
        let task = tokio::spawn(async move {
            let result = call
                .await
                .map_err(CacheError::from)
                .and_then(|creds| usable(creds, clock.now(), min_remaining));
            let mut state = entry_for_task.state.lock().expect("cache lock poisoned");
            state.inflight = None;
            match &result {
                Ok(creds) => {
                    state.current = Some(creds.clone());
                    state.last_failure = None;
                }
                Err(e) => state.last_failure = Some((Instant::now(), e.clone())),
            }
            result
        });
        let fetch = async move { task.await.unwrap_or(Err(CacheError::TaskFailed)) }
            .boxed()
            .shared();
        state.inflight = Some(fetch.clone());
        fetch
    }
}

fn recently_failed(state: &EntryState) -> bool {
    state
        .last_failure
        .as_ref()
        .is_some_and(|(at, _)| at.elapsed() < FAILURE_HOLD)
}

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
