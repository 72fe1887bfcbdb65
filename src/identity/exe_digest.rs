//! SHA-256 digests of callers' executables for `exe_sha256` rules, without letting a caller make
//! the daemon do unbounded work: hashing reads a whole file, and a caller chooses which file.
//!
//! - A digest is kept per file version, keyed by (device, inode, size, mtime, ctime) from
//!   `fstat` of the executable the process runs: a service's many connections hash it once,
//!   and any write to the file (which moves its ctime, which nobody can set back) makes a new
//!   version.
//! - A file larger than `limits.exe_hash_max_mib` is never read, so never matches.
//! - Before any byte is read, the file's size is charged to its caller's uid
//!   (`limits.exe_hash_mib_per_second`): a uid over its budget is refused until it refills.
//! - One file is hashed at a time, so however many uids ask, hashing holds at most one core.
//! - Callers are only hashed when a rule's other criteria already hold
//!   ([`crate::policy::wants_exe_hash`]).
//! - Both maps are bounded ([`crate::bounded`]): at most [`MAX_CACHED`] digests, those not
//!   asked for in the longest time going first, and at most [`MAX_TRACKED_UIDS`] budgets, the
//!   fullest going first (a uid that spent its budget keeps owing it).

use std::fs::File;
use std::io::{self, Read};
use std::num::NonZeroU32;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use governor::clock::DefaultClock;
use governor::{Quota, RateLimiter};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::bounded::{BoundedRateStore, Generations};
use crate::config::Limits;
use crate::identity::process;

const MIB: u64 = 1 << 20;
/// Digests kept (an attacker minting file versions cannot grow the cache without bound).
pub const MAX_CACHED: usize = 4096;
/// Uids whose hashing budget is kept.
pub const MAX_TRACKED_UIDS: usize = 10_000;

/// Identifies one version of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Why a caller's executable has no digest.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// Not an error of the caller's: the file is simply not eligible.
    #[error("executable is {mib} MiB, over limits.exe_hash_max_mib ({max} MiB): never hashed")]
    TooLarge { mib: u64, max: u32 },
    #[error("uid {uid} has used its executable-hashing budget; try again shortly")]
    OverBudget { uid: u32 },
    #[error("the process exited or was replaced while its executable was being opened")]
    Replaced,
    #[error("cannot hash /proc/{pid}/exe: {source}")]
    Io { pid: u32, source: io::Error },
}

type UidLimiter = RateLimiter<u32, BoundedRateStore<u32>, DefaultClock>;

pub struct ExeDigests {
    cache: Mutex<Generations<FileVersion, Arc<str>>>,
    /// [`crate::metrics::CALLER_STATE`] for `cache`.
    cached: metrics::Gauge,
    per_uid: UidLimiter,
    one_at_a_time: Semaphore,
    max_bytes: u64,
    /// Files hashed (cache misses), for tests and benchmarks.
    hashed: std::sync::atomic::AtomicU64,
}

impl ExeDigests {
    /// For `[limits]`.
    pub fn from_limits(limits: &Limits) -> Self {
        Self::new(limits.exe_hash_max_mib, limits.exe_hash_mib_per_second)
    }

    /// Files of up to `max_mib` are hashed, at `mib_per_second` per uid (a zero counts as 1).
    pub fn new(max_mib: u32, mib_per_second: u32) -> Self {
        let max_mib = NonZeroU32::new(max_mib).unwrap_or(NonZeroU32::MIN);
        let rate = NonZeroU32::new(mib_per_second).unwrap_or(NonZeroU32::MIN);
        let budgets = metrics::gauge!(crate::metrics::CALLER_STATE, "map" => "exe_hash_budget");
        Self {
            cache: Mutex::new(Generations::new(MAX_CACHED)),
            cached: metrics::gauge!(crate::metrics::CALLER_STATE, "map" => "exe_digests"),
            per_uid: RateLimiter::new(
                Quota::per_second(rate).allow_burst(max_mib),
                BoundedRateStore::new(MAX_TRACKED_UIDS, Some(budgets)),
                DefaultClock::default(),
            ),
            one_at_a_time: Semaphore::new(1),
            max_bytes: u64::from(max_mib.get()) * MIB,
            hashed: Default::default(),
        }
    }

    /// How many files were read and hashed so far (cache hits excluded).
    pub fn files_hashed(&self) -> u64 {
        self.hashed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The hex SHA-256 of the executable that process `pid` (started at `start_time`, run by
    /// `uid`) runs. A cached digest costs an `open` and an `fstat`; anything else is checked
    /// against the limits before it is read, then read on the blocking pool.
    pub async fn digest(
        self: &Arc<Self>,
        pid: u32,
        start_time: u64,
        uid: u32,
    ) -> Result<Arc<str>, DigestError> {
        let io = |source| DigestError::Io { pid, source };
        // Opened by pid, then checked to still be the process we identified: a pid reused in
        // between has another start time.
        let file = File::open(format!("/proc/{pid}/exe")).map_err(io)?;
        if process::start_time(pid).ok() != Some(start_time) {
            return Err(DigestError::Replaced);
        }
        let version = FileVersion::of(&file.metadata().map_err(io)?);
        if let Some(hit) = self.cache.lock().expect("digest cache").get(&version) {
            return Ok(hit.clone());
        }
        if version.size > self.max_bytes {
            return Err(DigestError::TooLarge {
                mib: version.size.div_ceil(MIB),
                max: (self.max_bytes / MIB) as u32,
            });
        }
        let cost = NonZeroU32::new(version.size.div_ceil(MIB).max(1) as u32)
            .expect("at least one MiB is charged");
        if self.per_uid.check_key_n(&uid, cost) != Ok(Ok(())) {
            return Err(DigestError::OverBudget { uid });
        }
        let _turn = self
            .one_at_a_time
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.hash_and_keep(file, version, pid))
            .await
            .map_err(|e| io(io::Error::other(e)))?
    }

    fn hash_and_keep(
        &self,
        file: File,
        version: FileVersion,
        pid: u32,
    ) -> Result<Arc<str>, DigestError> {
        // Read at most the size that was charged: a file that grows meanwhile is another
        // version, and its digest would not be this one's.
        let digest: Arc<str> = hash_reader(file.take(version.size))
            .map_err(|source| DigestError::Io { pid, source })?
            .into();
        self.hashed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut cache = self.cache.lock().expect("digest cache");
        cache.insert(version, digest.clone());
        self.cached.set(cache.len() as f64);
        Ok(digest)
    }
}

/// Lower-case hex SHA-256 of everything `reader` yields.
pub fn hash_reader(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> (u32, u64) {
        let pid = std::process::id();
        (pid, process::start_time(pid).unwrap())
    }

    #[tokio::test]
    async fn one_file_version_is_hashed_once() {
        let digests = Arc::new(ExeDigests::new(1024, 1));
        let (pid, start) = me();
        let expected = hash_reader(File::open("/proc/self/exe").unwrap()).unwrap();
        for _ in 0..20 {
            let got = digests.digest(pid, start, 4242).await.unwrap();
            assert_eq!(&*got, expected);
        }
        assert_eq!(digests.files_hashed(), 1);
    }

    #[tokio::test]
    async fn a_file_over_the_limit_is_never_read() {
        let digests = Arc::new(ExeDigests::new(1, 1024));
        let (pid, start) = me();
        // The test binary is far larger than 1 MiB.
        assert!(
            File::open("/proc/self/exe")
                .unwrap()
                .metadata()
                .unwrap()
                .len()
                > MIB
        );
        let err = digests.digest(pid, start, 4242).await.unwrap_err();
        assert!(matches!(err, DigestError::TooLarge { max: 1, .. }), "{err}");
        assert_eq!(digests.files_hashed(), 0);
    }

    #[tokio::test]
    async fn the_size_is_charged_to_the_uid_before_reading() {
        let size_mib = File::open("/proc/self/exe")
            .unwrap()
            .metadata()
            .unwrap()
            .len()
            .div_ceil(MIB) as u32;
        // The burst holds one file of the maximum size; this file is over half of it, so a
        // second, different version in the same instant is over budget.
        let digests = Arc::new(ExeDigests::new(size_mib * 3 / 2, 1));
        let (pid, start) = me();
        digests.digest(pid, start, 7).await.unwrap();
        *digests.cache.lock().unwrap() = Generations::new(MAX_CACHED); // as if the file had changed
        let err = digests.digest(pid, start, 7).await.unwrap_err();
        assert!(matches!(err, DigestError::OverBudget { uid: 7 }), "{err}");
        // Another uid has its own budget.
        digests.digest(pid, start, 8).await.unwrap();
        assert_eq!(digests.files_hashed(), 2);
    }

    #[tokio::test]
    async fn a_flood_of_file_versions_keeps_the_cache_bounded_and_a_live_digest_cached() {
        let digests = Arc::new(ExeDigests::new(1024, 1024));
        let (pid, start) = me();
        let mine = digests.digest(pid, start, 7).await.unwrap();
        let file = File::open("/proc/self/exe").unwrap();
        let live = FileVersion::of(&file.metadata().unwrap());
        for n in 0..(MAX_CACHED * 5) as u64 {
            // Versions an attacker mints by touching a copy (only its ctime moves).
            let version = FileVersion {
                ctime: (n as i64, 0),
                ..live
            };
            let mut cache = digests.cache.lock().unwrap();
            cache.insert(version, "x".into());
            assert!(cache.len() <= MAX_CACHED);
            // The service that keeps connecting is still a hit.
            if n % 1000 == 0 {
                assert_eq!(cache.get(&live), Some(&mine));
            }
        }
        let before = digests.files_hashed();
        digests.digest(pid, start, 7).await.unwrap();
        assert_eq!(
            digests.files_hashed(),
            before,
            "the live digest was hashed again"
        );
        let first = FileVersion {
            ctime: (0, 0),
            ..live
        };
        assert!(digests.cache.lock().unwrap().get(&first).is_none());
    }

    #[tokio::test]
    async fn a_replaced_process_is_not_hashed() {
        let digests = Arc::new(ExeDigests::new(1024, 1024));
        let (pid, start) = me();
        let err = digests.digest(pid, start + 1, 7).await.unwrap_err();
        assert!(matches!(err, DigestError::Replaced), "{err}");
    }
}
