//! Container metadata kept only while the runtime's event stream can say when it changes, and
//! the lookups in flight, so concurrent callers asking about one container share one request.
//!
//! Trust rule: an entry is served only if the stream is connected now and has been connected
//! without a break since before the request that fetched it was sent. Each connect and each
//! disconnect starts a new epoch; an entry carries the epoch its request started in, and a
//! lookup that started while the stream was down is never kept. An event about a container
//! drops its entry and detaches its lookup in flight, whose answer may predate the event. An
//! entry is also refetched once it is [`MAX_AGE`] old, in case an event was lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::RuntimeError;
use crate::identity::container::ContainerMeta;

/// Entries kept at most. A host runs far fewer containers; past this one entry is dropped per
/// insert, which costs a request, never a wrong answer.
pub const MAX_ENTRIES: usize = 4096;

/// An entry older than this (counted from when its request was sent) is fetched again. Events
/// can be lost without a sign on the stream: dockerd skips an event for a subscriber that has
/// not taken it within 100 ms. This bounds how long a lost one can leave a wrong answer, at the
/// cost of one request per container per period.
pub const MAX_AGE: Duration = Duration::from_secs(60);

pub(super) type Outcome = Result<Arc<ContainerMeta>, RuntimeError>;

/// What the event stream has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Status {
    pub connected: bool,
    /// Bumped at each connect and disconnect, and when an event names no container.
    pub epoch: u64,
    /// Container events applied.
    pub events: u64,
}

pub(super) struct Cache {
    state: Mutex<State>,
    /// A copy of `State::status`, for waiting on a change (tests) and reading without the lock.
    status: watch::Sender<Status>,
}

#[derive(Default)]
struct State {
    status: Status,
    entries: HashMap<String, Entry>,
    flights: HashMap<String, Flight>,
    next_flight: u64,
}

struct Entry {
    meta: Arc<ContainerMeta>,
    epoch: u64,
    asked: Instant,
}

/// A lookup in flight, which later callers join.
struct Flight {
    number: u64,
    answer: watch::Receiver<Option<Outcome>>,
}

pub(super) enum Lookup {
    Hit(Arc<ContainerMeta>),
    /// Another caller's request is in flight: its answer.
    Join(watch::Receiver<Option<Outcome>>),
    /// This caller sends the request and hands the answer to [`Cache::finish`].
    Lead(Leader),
}

pub(super) struct Leader {
    pub id: String,
    number: u64,
    /// The epoch the request started in, if the stream was connected then.
    epoch: Option<u64>,
    asked: Instant,
    answer: watch::Sender<Option<Outcome>>,
}

impl Leader {
    pub fn answer(&self) -> watch::Receiver<Option<Outcome>> {
        self.answer.subscribe()
    }
}

impl Cache {
    pub fn new() -> Self {
        Cache {
            state: Mutex::default(),
            status: watch::Sender::new(Status::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    #[cfg(test)]
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// The entry for `id` if it can be trusted, else the lookup to join or to lead.
    pub fn begin(&self, id: &str) -> Lookup {
        let mut state = self.lock();
        let status = state.status;
        if let Some(entry) = state.entries.get(id) {
            if status.connected && entry.epoch == status.epoch && entry.asked.elapsed() < MAX_AGE {
                return Lookup::Hit(entry.meta.clone());
            }
            state.entries.remove(id);
        }
        // A leader whose task ended without answering (a panic) is replaced, not joined.
        if let Some(flight) = state.flights.get(id)
            && flight.answer.has_changed().is_ok()
        {
            return Lookup::Join(flight.answer.clone());
        }
        state.next_flight += 1;
        let number = state.next_flight;
        let (answer, receiver) = watch::channel(None);
        state.flights.insert(
            id.to_owned(),
            Flight {
                number,
                answer: receiver,
            },
        );
        Lookup::Lead(Leader {
            id: id.to_owned(),
            number,
            epoch: status.connected.then_some(status.epoch),
            asked: Instant::now(),
            answer,
        })
    }

    /// Ends `leader`'s lookup: keeps the answer if it may be trusted, and hands it to every
    /// caller that joined.
    pub fn finish(&self, leader: Leader, outcome: Outcome) {
        let mut state = self.lock();
        let current = state
            .flights
            .get(&leader.id)
            .is_some_and(|f| f.number == leader.number);
        if current {
            state.flights.remove(&leader.id);
        }
        let status = state.status;
        if let Ok(meta) = &outcome
            && current
            && status.connected
            && leader.epoch == Some(status.epoch)
        {
            if state.entries.len() >= MAX_ENTRIES
                && !state.entries.contains_key(&leader.id)
                && let Some(victim) = state.entries.keys().next().cloned()
            {
                state.entries.remove(&victim);
            }
            let entry = Entry {
                meta: meta.clone(),
                epoch: status.epoch,
                asked: leader.asked,
            };
            state.entries.insert(leader.id.clone(), entry);
        }
        drop(state);
        leader.answer.send_replace(Some(outcome));
    }

    /// The event stream is connected: from now on, what is fetched may be kept.
    pub fn connected(&self) {
        self.update(|state| {
            state.status.connected = true;
            state.status.epoch += 1;
            state.entries.clear();
        });
    }

    /// The event stream is down: changes may go unseen, so nothing is kept until it is back.
    pub fn disconnected(&self) {
        self.update(|state| {
            state.status.connected = false;
            state.status.epoch += 1;
            state.entries.clear();
        });
    }

    /// Container `id` changed.
    pub fn changed(&self, id: &str) {
        self.update(|state| {
            state.entries.remove(id);
            // Its answer may predate the change: callers from now on send their own.
            state.flights.remove(id);
            state.status.events += 1;
        });
    }

    /// A container changed, and the event does not say which.
    pub fn changed_unknown(&self) {
        self.update(|state| {
            state.entries.clear();
            state.flights.clear();
            state.status.epoch += 1;
            state.status.events += 1;
        });
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.lock();
        change(&mut state);
        self.status.send_replace(state.status);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6ca462c7f0b71316d0a1291dd88368860d3c56bb5d1e7c324d8b506ddfd312ac";

    fn meta(name: &str) -> Arc<ContainerMeta> {
        Arc::new(ContainerMeta {
            id: ID.to_owned(),
            name: name.to_owned(),
            ..ContainerMeta::default()
        })
    }

    fn lead(cache: &Cache, id: &str) -> Leader {
        match cache.begin(id) {
            Lookup::Lead(leader) => leader,
            Lookup::Hit(_) => panic!("{id}: a hit"),
            Lookup::Join(_) => panic!("{id}: joined a lookup"),
        }
    }

    fn hit(cache: &Cache, id: &str) -> Option<Arc<ContainerMeta>> {
        match cache.begin(id) {
            Lookup::Hit(meta) => Some(meta),
            Lookup::Lead(leader) => {
                // Leave no flight behind for the next check.
                cache.finish(leader, Err(RuntimeError::Protocol("unused".into())));
                None
            }
            Lookup::Join(_) => panic!("joined a lookup"),
        }
    }

    #[test]
    fn kept_only_when_fetched_and_served_within_one_connected_epoch() {
        let cache = Cache::new();
        // Stream down: fetched, answered, not kept.
        cache.finish(lead(&cache, ID), Ok(meta("a")));
        assert_eq!(cache.len(), 0);
        assert!(hit(&cache, ID).is_none());

        // Started while down, answered after the stream connected: still not kept.
        let early = lead(&cache, ID);
        cache.connected();
        cache.finish(early, Ok(meta("a")));
        assert!(hit(&cache, ID).is_none());

        cache.finish(lead(&cache, ID), Ok(meta("a")));
        assert_eq!(hit(&cache, ID).map(|m| m.name.clone()), Some("a".into()));

        // A break, however short, ends the trust in everything fetched before it.
        cache.disconnected();
        assert!(hit(&cache, ID).is_none());
        cache.connected();
        assert!(hit(&cache, ID).is_none());

        // A request that spanned a reconnect is not kept either.
        let spanning = lead(&cache, ID);
        cache.disconnected();
        cache.connected();
        cache.finish(spanning, Ok(meta("a")));
        assert!(hit(&cache, ID).is_none());
    }

    #[test]
    fn an_event_detaches_the_lookup_in_flight() {
        let cache = Cache::new();
        cache.connected();
        let first = lead(&cache, ID);
        // Joined before the event: shares the first answer.
        let Lookup::Join(mut joined) = cache.begin(ID) else {
            panic!("no join");
        };
        cache.changed(ID);
        // After the event: a request of its own.
        let second = lead(&cache, ID);
        cache.finish(first, Ok(meta("before")));
        assert!(matches!(&*joined.borrow_and_update(), Some(Ok(m)) if m.name == "before"));
        // The answer that may predate the event was not kept; the later one is.
        cache.finish(second, Ok(meta("after")));
        assert_eq!(
            hit(&cache, ID).map(|m| m.name.clone()),
            Some("after".into())
        );
    }

    #[test]
    fn an_event_without_an_id_forgets_everything() {
        let cache = Cache::new();
        cache.connected();
        cache.finish(lead(&cache, ID), Ok(meta("a")));
        let in_flight = lead(&cache, "b");
        cache.changed_unknown();
        cache.finish(in_flight, Ok(meta("b")));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn errors_are_shared_but_not_kept() {
        let cache = Cache::new();
        cache.connected();
        let leader = lead(&cache, ID);
        let Lookup::Join(mut joined) = cache.begin(ID) else {
            panic!("no join");
        };
        let gone = RuntimeError::NotFound {
            id: ID.into(),
            socket: "/s".into(),
        };
        cache.finish(leader, Err(gone.clone()));
        assert_eq!(*joined.borrow_and_update(), Some(Err(gone)));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_leader_that_vanished_is_replaced() {
        let cache = Cache::new();
        drop(lead(&cache, ID));
        lead(&cache, ID);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_fetched_again_once_old() {
        let cache = Cache::new();
        cache.connected();
        let leader = lead(&cache, ID);
        // The age counts from the request, not from its answer.
        tokio::time::advance(MAX_AGE / 2).await;
        cache.finish(leader, Ok(meta("a")));
        tokio::time::advance(MAX_AGE / 2 - Duration::from_millis(1)).await;
        assert!(hit(&cache, ID).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(hit(&cache, ID).is_none());
    }

    #[test]
    fn bounded() {
        let cache = Cache::new();
        cache.connected();
        for i in 0..MAX_ENTRIES + 10 {
            cache.finish(lead(&cache, &i.to_string()), Ok(meta("x")));
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
    }
}
