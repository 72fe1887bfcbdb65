//! Which credential issuances the audit trail already holds. An SDK polls for credentials it
//! already has, and a client in a loop can ask thousands of times a second; one line per
//! (caller, endpoint, app, access key id) says everything the repeats would, and writing (and fsync-ing)
//! every repeat made the audit writer the daemon's bottleneck. The metrics still count each
//! serve.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use crate::bounded::Generations;
use crate::identity::Caller;

/// Issuances remembered at most; those not repeated for longest are forgotten first, so a
/// rotation's old keys and callers long gone do not accumulate while a caller that keeps
/// polling stays remembered. Forgetting only means auditing a repeat again.
pub const MAX_REMEMBERED: usize = 4096;

/// Issuances already audited, keyed by a hash of (caller identity, endpoint, app, access key
/// id). The
/// full key is stored and compared, so a hash collision can only cause a repeat to be audited
/// again, never a new issuance to be skipped.
pub struct Issued {
    seen: Mutex<Generations<u64, Seen>>,
    hasher: RandomState,
    /// [`crate::metrics::CALLER_STATE`] for `seen`.
    size: metrics::Gauge,
}

struct Seen {
    caller: Caller,
    endpoint: &'static str,
    app: String,
    access_key_id: String,
}

impl Default for Issued {
    fn default() -> Self {
        Self {
            seen: Mutex::new(Generations::new(MAX_REMEMBERED)),
            hasher: RandomState::new(),
            size: metrics::gauge!(crate::metrics::CALLER_STATE, "map" => "audit_repeats"),
        }
    }
}

impl Issued {
    /// Runs `audit` if this is the first issuance of `access_key_id` for `app` to `caller` on
    /// `endpoint`; whether the issuance is in the trail (or on its way): `audit` says whether
    /// its line was queued, and one that was not is not remembered, so the next repeat tries
    /// again.
    /// `audit` runs under the lock, so no concurrent repeat is answered before the first one's
    /// event is queued: credentials never leave ahead of their audit line.
    pub fn once(
        &self,
        caller: &Caller,
        endpoint: &'static str,
        app: &str,
        access_key_id: &str,
        audit: impl FnOnce() -> bool,
    ) -> bool {
        let hash = self
            .hasher
            .hash_one((identity(caller), endpoint, app, access_key_id));
        // A panic elsewhere while holding the lock leaves the map consistent (each change is one
        // insert or one generation replaced), and the audit trail must keep working.
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.get(&hash).is_some_and(|s| {
            s.endpoint == endpoint
                && s.app == app
                && s.access_key_id == access_key_id
                && same(&s.caller, caller)
        }) {
            return true;
        }
        if !audit() {
            return false;
        }
        seen.insert(
            hash,
            Seen {
                caller: caller.clone(),
                endpoint,
                app: app.to_owned(),
                access_key_id: access_key_id.to_owned(),
            },
        );
        self.size.set(seen.len() as f64);
        true
    }
}

/// What the audit line says about a caller, except the peer's port: a client that reconnects
/// is the same caller, a new process (pid and start time) or another address is not.
type Identity<'a> = (
    IpAddr,
    Option<u32>,
    Option<&'a str>,
    Option<&'a str>,
    Option<(u32, u64, u32, u32, &'a Path)>,
    Option<&'a str>,
    bool,
);

fn identity(caller: &Caller) -> Identity<'_> {
    (
        caller.peer().ip(),
        caller.uid(),
        caller.cgroup(),
        caller.unit(),
        caller
            .process()
            .map(|p| (p.pid, p.start_time, p.uid, p.gid, p.exe.as_path())),
        caller.local().and_then(|l| l.exe_sha256.as_deref()),
        caller.local().is_some(),
    )
}

fn same(a: &Caller, b: &Caller) -> bool {
    identity(a) == identity(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCaller;
    use crate::identity::process::ProcessInfo;

    fn caller(uid: u32, pid: u32, port: u16) -> Caller {
        Caller::Local(LocalCaller {
            peer: format!("127.0.0.1:{port}").parse().unwrap(),
            uid,
            cgroup: Some("/user.slice".into()),
            unit: None,
            user_unit: None,
            process: Some(ProcessInfo {
                pid,
                uid,
                gid: uid,
                exe: "/usr/bin/python3".into(),
                start_time: 100,
            }),
            exe_sha256: None,
            netns: None,
            container: None,
        })
    }

    fn audited(issued: &Issued, caller: &Caller, app: &str, key: &str) -> bool {
        let mut ran = false;
        issued.once(caller, "imds", app, key, || {
            ran = true;
            true
        });
        ran
    }

    #[test]
    fn repeats_are_audited_once_and_anything_new_again() {
        let issued = Issued::default();
        let first = caller(1000, 10, 4000);
        assert!(audited(&issued, &first, "a", "ASIA1"));
        assert!(!audited(&issued, &first, "a", "ASIA1"));
        // Reconnected: another port, the same process.
        assert!(!audited(&issued, &caller(1000, 10, 4001), "a", "ASIA1"));
        assert!(audited(&issued, &first, "a", "ASIA2"), "new key");
        assert!(audited(&issued, &first, "b", "ASIA1"), "other app");
        let mut ran = false;
        issued.once(&first, "container", "a", "ASIA1", || {
            ran = true;
            true
        });
        assert!(ran, "other endpoint");
        assert!(
            audited(&issued, &caller(1000, 11, 4000), "a", "ASIA1"),
            "pid"
        );
        assert!(
            audited(&issued, &caller(1001, 10, 4000), "a", "ASIA1"),
            "uid"
        );
        let mut reused_pid = caller(1000, 10, 4000);
        if let Caller::Local(l) = &mut reused_pid {
            l.process.as_mut().unwrap().start_time = 200;
        }
        assert!(audited(&issued, &reused_pid, "a", "ASIA1"), "pid reused");
        let remote = |ip: &str| Caller::Remote {
            peer: format!("{ip}:80").parse().unwrap(),
        };
        assert!(audited(&issued, &remote("10.0.0.1"), "a", "ASIA1"));
        assert!(!audited(&issued, &remote("10.0.0.1"), "a", "ASIA1"));
        assert!(audited(&issued, &remote("10.0.0.2"), "a", "ASIA1"));
    }

    #[test]
    fn memory_is_bounded_and_forgetting_only_audits_again() {
        let issued = Issued::default();
        let me = caller(1000, 10, 4000);
        for n in 0..MAX_REMEMBERED * 2 + 7 {
            assert!(audited(&issued, &me, "a", &format!("ASIA{n}")));
            assert!(issued.seen.lock().unwrap().len() <= MAX_REMEMBERED);
        }
        assert!(!audited(
            &issued,
            &me,
            "a",
            &format!("ASIA{}", MAX_REMEMBERED * 2 + 6)
        ));
        // The oldest went first: auditing it again is what forgetting costs.
        assert!(audited(&issued, &me, "a", "ASIA0"));
    }

    #[test]
    fn ten_thousand_callers_do_not_make_a_polling_caller_audited_again() {
        let issued = Issued::default();
        let polling = caller(1000, 10, 4000);
        assert!(audited(&issued, &polling, "a", "ASIA1"));
        for uid in 0..10_000 {
            assert!(audited(
                &issued,
                &caller(100_000 + uid, 20 + uid, 4000),
                "a",
                "ASIA1"
            ));
            assert!(issued.seen.lock().unwrap().len() <= MAX_REMEMBERED);
            // An SDK polls its credentials every few minutes, every few hundred new callers.
            if uid % 500 == 0 {
                assert!(!audited(&issued, &polling, "a", "ASIA1"), "after {uid}");
            }
        }
    }

    #[test]
    fn an_issuance_whose_line_was_dropped_is_not_remembered() {
        let issued = Issued::default();
        let me = caller(1000, 10, 4000);
        assert!(!issued.once(&me, "imds", "a", "ASIA1", || false));
        // The repeat is audited (and may be refused) again, not waved through as recorded.
        assert!(audited(&issued, &me, "a", "ASIA1"));
        assert!(issued.once(&me, "imds", "a", "ASIA1", || unreachable!()));
    }

    #[test]
    fn a_hash_collision_never_hides_a_new_issuance() {
        let issued = Issued::default();
        let me = caller(1000, 10, 4000);
        assert!(audited(&issued, &me, "a", "ASIA1"));
        // Plant a different issuance under the hash a new one will have.
        let other = caller(2000, 20, 4000);
        let hash = issued
            .hasher
            .hash_one((identity(&other), "imds", "a", "ASIA9"));
        issued.seen.lock().unwrap().insert(
            hash,
            Seen {
                caller: me.clone(),
                endpoint: "imds",
                app: "a".into(),
                access_key_id: "ASIA1".into(),
            },
        );
        assert!(audited(&issued, &other, "a", "ASIA9"));
    }
}
