//! Bounded state for things that grow with distinct callers: every map keyed by something a
//! caller chooses (its uid, cgroup, executable, address) holds a fixed number of entries at
//! most, drops the ones nobody uses first, and never drops one a caller is using.
//!
//! - [`Generations`]: a cache in two generations. Hits are kept in the current one; when it is
//!   full, it becomes the previous one and the old previous one is dropped. An entry used at
//!   least once per generation stays; one nobody asked for in two generations goes.
//! - [`BoundedRateStore`]: a governor state store with a hard cap. governor's own stores keep
//!   every key until swept, and a sweep keeps every key still inside its burst window, so a
//!   flood of distinct callers could grow them without bound. When full, the half whose
//!   buckets are fullest (the earliest theoretical arrival time: idle, or nearly) is dropped,
//!   which gives those callers back at most what they already had; the callers being limited
//!   stay limited.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use metrics::Gauge;

/// A map of at most `capacity` entries that forgets the least recently used generation.
pub struct Generations<K, V, S = RandomState> {
    current: HashMap<K, V, S>,
    previous: HashMap<K, V, S>,
    /// Entries per generation.
    per_generation: usize,
}

impl<K: Hash + Eq, V, S: BuildHasher + Clone> Generations<K, V, S> {
    /// At most `capacity` entries (at least 2), hashed with `hasher`.
    pub fn with_hasher(capacity: usize, hasher: S) -> Self {
        Self {
            current: HashMap::with_hasher(hasher.clone()),
            previous: HashMap::with_hasher(hasher),
            per_generation: (capacity / 2).max(1),
        }
    }

    /// The entry for `key`, kept into the current generation when it was in the previous one.
    pub fn get<Q>(&mut self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.current.contains_key(key) {
            let (key, value) = self.previous.remove_entry(key)?;
            self.insert(key, value);
        }
        self.current.get(key)
    }

    /// Puts `key` in the current generation, starting a new one first if it is full.
    pub fn insert(&mut self, key: K, value: V) {
        if self.current.len() >= self.per_generation && !self.current.contains_key(&key) {
            self.previous = std::mem::replace(
                &mut self.current,
                HashMap::with_capacity_and_hasher(0, self.previous.hasher().clone()),
            );
        }
        self.previous.remove(&key);
        self.current.insert(key, value);
    }

    /// Entries held, both generations.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries ever held.
    pub fn capacity(&self) -> usize {
        self.per_generation * 2
    }
}

impl<K: Hash + Eq, V> Generations<K, V> {
    /// At most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self::with_hasher(capacity, RandomState::new())
    }
}

/// A keyed governor state store of at most `capacity` keys (see the module's description).
pub struct BoundedRateStore<K> {
    /// Each key's theoretical arrival time, as governor measures it.
    tats: Mutex<HashMap<K, Nanos>>,
    capacity: usize,
    /// Set to the number of keys whenever it changes.
    size: Option<Gauge>,
}

impl<K: Hash + Eq + Clone> BoundedRateStore<K> {
    /// At most `capacity` keys (at least 2); `size` is set to the number held when it changes.
    pub fn new(capacity: usize, size: Option<Gauge>) -> Self {
        Self {
            tats: Mutex::new(HashMap::new()),
            capacity: capacity.max(2),
            size,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Nanos>> {
        // Every update is one insert or one removal: a panic elsewhere leaves it consistent.
        self.tats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, len: usize) {
        if let Some(gauge) = &self.size {
            gauge.set(len as f64);
        }
    }

    /// Drops the half of the keys with the earliest theoretical arrival time.
    fn evict_fullest_buckets(tats: &mut HashMap<K, Nanos>, keep: usize) {
        let drop = tats.len().saturating_sub(keep);
        if drop == 0 {
            return;
        }
        let mut times: Vec<u64> = tats.values().map(|t| t.as_u64()).collect();
        let (_, &mut cut, _) = times.select_nth_unstable(drop - 1);
        // Strictly earlier ones all go; of those at the cut, as many as still need to.
        tats.retain(|_, t| t.as_u64() > cut);
        let mut left = tats.len().saturating_sub(keep);
        tats.retain(|_, t| {
            if left > 0 && t.as_u64() == cut {
                left -= 1;
                false
            } else {
                true
            }
        });
    }
}

impl<K: Hash + Eq + Clone> StateStore for BoundedRateStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut tats = self.lock();
        // The lock makes the read and the write one step, so no compare-and-swap loop.
        let (outcome, tat) = f(tats.get(key).copied())?;
        if let Some(slot) = tats.get_mut(key) {
            *slot = tat;
            return Ok(outcome);
        }
        if tats.len() >= self.capacity {
            Self::evict_fullest_buckets(&mut tats, self.capacity / 2);
        }
        tats.insert(key.clone(), tat);
        self.publish(tats.len());
        Ok(outcome)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedRateStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut tats = self.lock();
        // As governor's own stores: a key at or below this is indistinguishable from a new one.
        tats.retain(|_, t| *t > drop_below);
        self.publish(tats.len());
    }

    fn shrink_to_fit(&self) {
        self.lock().shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_hold_at_most_their_capacity_and_keep_what_is_used() {
        let mut map = Generations::new(100);
        map.insert("live".to_string(), 0);
        for n in 0..10_000 {
            map.insert(format!("k{n}"), n);
            assert!(map.len() <= map.capacity(), "{} entries", map.len());
            // A caller that keeps coming back is never forgotten.
            assert_eq!(map.get("live"), Some(&0), "after {n}");
        }
        // The oldest are gone, the newest are there.
        assert!(map.get("k0").is_none());
        assert!(map.get("k5000").is_none());
        assert_eq!(map.get("k9999"), Some(&9999));
        assert_eq!(map.capacity(), 100);
    }

    #[test]
    fn an_entry_unused_for_two_generations_goes() {
        let mut map = Generations::new(10);
        map.insert(1, ());
        for n in 100..105 {
            map.insert(n, ());
        }
        // One generation later, still there (and promoted by this read).
        assert!(map.get(&1).is_some());
        for n in 200..220 {
            map.insert(n, ());
        }
        assert!(map.get(&1).is_none());
    }

    fn store(capacity: usize) -> BoundedRateStore<u32> {
        BoundedRateStore::new(capacity, None)
    }

    const INTERVAL: u64 = 10_000_000; // 10 ms between requests...
    const TAU: u64 = 1_000_000_000; // ...and a burst of 100.

    /// One request by `key` at `now` (ns), decided as governor's GCRA would.
    fn hit(store: &BoundedRateStore<u32>, key: u32, now: u64) -> Result<(), ()> {
        store.measure_and_replace(&key, |tat| {
            let tat = tat.map_or(now, |t| t.as_u64()).max(now);
            if tat + INTERVAL - now > TAU {
                Err(())
            } else {
                Ok(((), Nanos::new(tat + INTERVAL)))
            }
        })
    }

    #[test]
    fn the_rate_store_is_capped_and_a_limited_caller_stays_limited() {
        let store = store(1000);
        // The noisy caller uses its whole burst.
        for _ in 0..100 {
            hit(&store, 7, 0).unwrap();
        }
        assert!(hit(&store, 7, 0).is_err());
        // 49,000 callers of one request each, within the next 49 ms.
        for key in 1000..50_000u32 {
            hit(&store, key, u64::from(key) * 1000).unwrap();
            assert!(store.len() <= 1000);
        }
        // Its state survived: at the instant of its burst it is still refused.
        assert!(
            store.lock().contains_key(&7),
            "the flood reset a limited caller"
        );
        assert!(hit(&store, 7, 0).is_err());
        // The keys that went first are the earliest: the first flood keys are gone.
        assert!(!store.lock().contains_key(&1000));
        assert!(store.lock().contains_key(&49_999));
        // A caller within its rate is admitted throughout.
        for n in 0..100u64 {
            hit(&store, 3, 50_000_000 + n * INTERVAL).unwrap();
            for key in 0..100u32 {
                hit(
                    &store,
                    100_000 + key + n as u32 * 100,
                    50_000_000 + n * INTERVAL,
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn retain_recent_drops_idle_keys() {
        let store = store(100);
        for key in 0..50 {
            hit(&store, key, u64::from(key) * 1_000_000_000).unwrap();
        }
        assert_eq!(store.len(), 50);
        // Keys whose next arrival is at or before 30 s are as good as new.
        store.retain_recent(Nanos::new(30_000_000_000));
        assert_eq!(store.len(), 20);
    }
}
