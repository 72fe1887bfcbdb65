//! Replacing the key, so that a crash at any point leaves a file whose key works, and
//! repairing what a crash left at the next start.
//!
//! The steps of [`AccessKeySource::rotate`] and what a crash after each leaves:
//!
//! | after | the file holds | the user's keys | [`AccessKeySource::reconcile`] at the next start |
//! |---|---|---|---|
//! | finding the user | old key | old | nothing to do |
//! | CreateAccessKey ([`Step::KeyCreated`]) | old | old, new | old works: delete new (never written anywhere) |
//! | the new key works ([`Step::KeyWorks`]) | old | old, new | the same |
//! | the file is replaced ([`Step::FileWritten`]) | new | old, new | new works: delete old |
//! | the source switched ([`Step::Switched`]) | new | old, new | the same |
//! | DeleteAccessKey of the old key | new | new | nothing to do |
//!
//! The file is replaced atomically (rename of a synced file, then a sync of the directory), so
//! a crash during that step is one of the rows around it. Before the file is replaced it holds
//! the old key, which nothing has deleted; after, it holds the new key, which STS has already
//! accepted. Every deletion goes through one function that re-reads the file and refuses to
//! delete the key in it, and reconcile deletes nothing until the file's key has worked, so the
//! user is never left with zero keys by the daemon.

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;

use super::{AccessKeyError, AccessKeySource, Clients, Key, key_hint, user};

/// IAM is eventually consistent: a new key can be refused by STS for some seconds after
/// CreateAccessKey returns (AWS documents "a few seconds"; tens of seconds are seen). A key
/// that still fails after this long is taken as not working, and the file keeps the old key.
const NEW_KEY_PATIENCE: Duration = Duration::from_secs(60);
/// The first wait between tries of a new key; it doubles up to [`NEW_KEY_RETRY_MAX`].
const NEW_KEY_RETRY_FIRST: Duration = Duration::from_millis(500);
const NEW_KEY_RETRY_MAX: Duration = Duration::from_secs(8);
/// After a failed rotation the loop tries again after this, doubling with each failure up to
/// [`ROTATION_RETRY_MAX`]: soon enough that a passing IAM error costs little, slow enough that
/// a lasting one (a missing permission) does not flood CloudTrail.
const ROTATION_RETRY_FIRST: Duration = Duration::from_secs(60);
const ROTATION_RETRY_MAX: Duration = Duration::from_secs(60 * 60);

/// A step of a rotation that has just completed: where a test (or a crash) may stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The key's IAM user is known, and leftover keys are deleted.
    UserFound,
    /// IAM made the new key.
    KeyCreated,
    /// STS accepted the new key.
    KeyWorks,
    /// The file holds the new key.
    FileWritten,
    /// The source answers the new key.
    Switched,
}

impl Step {
    pub const ALL: [Step; 5] = [
        Step::UserFound,
        Step::KeyCreated,
        Step::KeyWorks,
        Step::FileWritten,
        Step::Switched,
    ];
}

/// A completed rotation, for the audit trail. Key ids only: never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub user: String,
    pub old_key_id: String,
    pub new_key_id: String,
}

/// What [`AccessKeySource::reconcile`] found, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub user: String,
    /// The key in the file, which works.
    pub key_id: String,
    /// Keys of the user that were not in the file (leftovers of a crashed rotation), deleted.
    pub deleted: Vec<String>,
}

impl AccessKeySource {
    /// Replaces the key with a new one of the same IAM user: create it, wait until STS accepts
    /// it, write it to the file, answer it, delete the old one.
    pub async fn rotate(&self, clients: &Clients) -> Result<Rotation, AccessKeyError> {
        self.rotate_with(clients, |_| ControlFlow::Continue(()))
            .await
    }

    /// [`rotate`](Self::rotate), calling `checkpoint` after each [`Step`]: `Break` stops the
    /// rotation there with [`AccessKeyError::Interrupted`] and nothing undone, as a crash would
    /// (the crash-safety tests use it).
    pub async fn rotate_with(
        &self,
        clients: &Clients,
        mut checkpoint: impl FnMut(Step) -> ControlFlow<()> + Send,
    ) -> Result<Rotation, AccessKeyError> {
        let mut reached = |step: Step| match checkpoint(step) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(AccessKeyError::Interrupted { step }),
        };
        let _changing = self.inner.changing.lock().await;
        let old = self.current();

        // (a) The user, from the key itself; this also proves the old key works.
        let user = user::user_of(&clients.sts_as(&old)).await?;
        // (b) IAM allows two keys per user. One that is not the key in the file can only be
        // the leftover of a rotation that crashed between CreateAccessKey and the rewrite of
        // the file: only that process ever held its secret, so deleting it loses nothing, and
        // keeping it would make CreateAccessKey fail with LimitExceeded. The key in the file is
        // never deleted (`delete_unless_in_file`).
        for key in user::list_keys(&clients.iam, &user).await? {
            if key.id != old.id {
                tracing::warn!(
                    key = %key_hint(&key.id),
                    user,
                    "deleting a key of the user that is not in the credentials file (left by an interrupted rotation)"
                );
                self.delete_unless_in_file(clients, &user, &key.id).await?;
            }
        }
        reached(Step::UserFound)?;

        let new = user::create_key(&clients.iam, &user).await?;
        reached(Step::KeyCreated)?;

        // (c) and (d): until the file holds the new key, a failure leaves the new key unused;
        // it is deleted here as a courtesy (reconcile or the next rotation would delete it).
        let written = async {
            wait_until_works(clients, &new, &user).await?;
            reached(Step::KeyWorks)?;
            self.inner.file.replace_key(&old.id, &new)
        }
        .await;
        match written {
            Ok(()) => {}
            // As a crash would: nothing undone.
            Err(e @ AccessKeyError::Interrupted { .. }) => return Err(e),
            // The rename happened and a later part of the write failed (the directory's
            // fsync): the file holds the new key, which works, so the rotation carries on.
            Err(e) if self.inner.file.read().is_ok_and(|k| k.id == new.id) => {
                tracing::warn!(error = %e, "the credentials file holds the new key, but its write reported an error");
            }
            Err(e) => {
                if let Err(cleanup) = self.delete_unless_in_file(clients, &user, &new.id).await {
                    tracing::warn!(
                        key = %key_hint(&new.id),
                        error = %cleanup,
                        "could not delete the unused new key; the next rotation or start will"
                    );
                }
                return Err(e);
            }
        }
        reached(Step::FileWritten)?;

        // (e) From here the SDK clients sign with the new key.
        self.inner.key.store(Arc::new(new.clone()));
        reached(Step::Switched)?;

        // (f) The old key is no longer in the file nor answered: delete it.
        let rotation = Rotation {
            user: user.clone(),
            old_key_id: old.id.clone(),
            new_key_id: new.id.clone(),
        };
        if let Err(e) = self.delete_unless_in_file(clients, &user, &old.id).await {
            return Err(AccessKeyError::OldKeyNotDeleted {
                rotation,
                source: Box::new(e),
            });
        }
        tracing::info!(
            user,
            old_key = %key_hint(&rotation.old_key_id),
            new_key = %key_hint(&rotation.new_key_id),
            "access key rotated"
        );
        Ok(rotation)
    }

    /// Repairs what an interrupted rotation left, at start: once the key in the file has
    /// worked (STS GetCallerIdentity), every other key of its user is deleted. Those were
    /// created by a rotation that crashed before (or after) the file changed: either never
    /// written anywhere, or the old key the file no longer holds. If the file's key does not
    /// work, nothing is deleted: the other key may be the only one that does.
    pub async fn reconcile(&self, clients: &Clients) -> Result<Reconciled, AccessKeyError> {
        let _changing = self.inner.changing.lock().await;
        let key = self.current();
        let user = user::user_of(&clients.sts_as(&key)).await.map_err(|e| {
            AccessKeyError::FileKeyFails {
                key: key_hint(&key.id),
                source: Box::new(e),
            }
        })?;
        let mut deleted = Vec::new();
        for other in user::list_keys(&clients.iam, &user).await? {
            if other.id != key.id {
                self.delete_unless_in_file(clients, &user, &other.id)
                    .await?;
                tracing::warn!(
                    key = %key_hint(&other.id),
                    user,
                    "deleted a key of the user that is not in the credentials file (left by an interrupted rotation)"
                );
                deleted.push(other.id);
            }
        }
        Ok(Reconciled {
            user,
            key_id: key.id.clone(),
            deleted,
        })
    }

    /// How old the current key is, from IAM's CreateDate: a restart does not reset the clock.
    pub async fn key_age(&self, clients: &Clients) -> Result<Duration, AccessKeyError> {
        let key = self.current();
        let user = user::user_of(&clients.sts_as(&key)).await?;
        let created = user::list_keys(&clients.iam, &user)
            .await?
            .into_iter()
            .find(|k| k.id == key.id)
            .and_then(|k| k.created)
            .ok_or_else(|| AccessKeyError::NotListed {
                key: key_hint(&key.id),
                user,
            })?;
        // A creation date ahead of this host's clock counts as new.
        Ok(SystemTime::now()
            .duration_since(created)
            .unwrap_or(Duration::ZERO))
    }

    /// Rotates whenever the key is `every` old, until `shutdown` completes; each outcome goes
    /// to `report` (the audit trail). A failed rotation is retried after a jittered, growing
    /// delay; a rotation that left the old key active is followed by a [`reconcile`] to delete
    /// it. A rotation under way is finished before shutdown is looked at: it is bounded (by
    /// `NEW_KEY_PATIENCE` and the call timeouts), and one cut short would leave a spare key
    /// until the next start.
    ///
    /// [`reconcile`]: Self::reconcile
    pub async fn run_rotation(
        self,
        clients: Clients,
        every: Duration,
        mut report: impl FnMut(&Result<Rotation, AccessKeyError>) + Send,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        tokio::pin!(shutdown);
        let mut failures: u32 = 0;
        let mut old_key_left = false;
        loop {
            let wait = if old_key_left && let Err(e) = self.reconcile(&clients).await {
                tracing::warn!(error = %e, "could not delete the previous access key");
                failures += 1;
                retry_delay(failures)
            } else {
                old_key_left = false;
                match self.key_age(&clients).await {
                    Ok(age) if age >= every => {
                        let outcome = self.rotate(&clients).await;
                        report(&outcome);
                        match outcome {
                            Ok(_) => {
                                failures = 0;
                                Duration::ZERO
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "access key rotation failed");
                                old_key_left = matches!(e, AccessKeyError::OldKeyNotDeleted { .. });
                                failures += 1;
                                retry_delay(failures)
                            }
                        }
                    }
                    Ok(age) => {
                        failures = 0;
                        every - age
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the access key's age");
                        failures += 1;
                        retry_delay(failures)
                    }
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Deletes the user's key `id` unless it is the key in the file right now: the file is what
    /// a restart falls back to, so its key is the one key no step may delete. The file is read
    /// again rather than trusted from memory, so a file changed under the daemon is covered too.
    async fn delete_unless_in_file(
        &self,
        clients: &Clients,
        user: &str,
        id: &str,
    ) -> Result<(), AccessKeyError> {
        if self.inner.file.read()?.id == id {
            return Err(AccessKeyError::WouldDeleteFileKey { key: key_hint(id) });
        }
        user::delete_key(&clients.iam, user, id).await
    }
}

/// Waits until STS accepts `key` as `user`'s, retrying with a growing delay for at most
/// [`NEW_KEY_PATIENCE`].
async fn wait_until_works(clients: &Clients, key: &Key, user: &str) -> Result<(), AccessKeyError> {
    let sts = clients.sts_as(key);
    let deadline = tokio::time::Instant::now() + NEW_KEY_PATIENCE;
    let mut delay = NEW_KEY_RETRY_FIRST;
    loop {
        let last = match user::user_of(&sts).await {
            Ok(found) if found == user => return Ok(()),
            Ok(found) => {
                return Err(AccessKeyError::OtherUser {
                    expected: user.to_owned(),
                    found,
                });
            }
            Err(e) => e,
        };
        if tokio::time::Instant::now() + delay > deadline {
            return Err(AccessKeyError::NewKeyNeverWorked {
                key: key_hint(&key.id),
                waited: NEW_KEY_PATIENCE,
                last: Box::new(last),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(NEW_KEY_RETRY_MAX);
    }
}

/// The wait before the next try after `failures` failed ones in a row: doubling from
/// [`ROTATION_RETRY_FIRST`] up to [`ROTATION_RETRY_MAX`], then a random point of its upper half,
/// so hosts that failed together (an IAM outage) do not retry together.
fn retry_delay(failures: u32) -> Duration {
    let doubling = ROTATION_RETRY_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let ceiling = doubling.min(ROTATION_RETRY_MAX);
    rand::rng().random_range(ceiling / 2..=ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccessKeyConfig, StsConfig};
    use crate::source::access_key::CALL_TIMEOUT;
    use std::os::unix::fs::PermissionsExt;

    /// A source read from a fresh file, and clients whose STS is a port nothing listens on.
    fn unreachable_sts() -> (tempfile::TempDir, AccessKeySource, Clients) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(
            &path,
            "[p]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = s\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let source = AccessKeySource::load(&AccessKeyConfig {
            credentials_file: path,
            profile: "p".into(),
            rotate_every: None,
            iam_endpoint_url: None,
        })
        .unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let sts = StsConfig {
            region: "us-east-1".into(),
            endpoint_url: Some(format!("http://127.0.0.1:{port}")),
            default_duration: Duration::from_secs(3600),
            max_calls_per_second: 10,
            burst: 50,
        };
        let clients = Clients::new(&source, &sts);
        (dir, source, clients)
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_key_that_never_works_is_given_up_on_after_the_patience() {
        let (_dir, source, clients) = unreachable_sts();
        let started = tokio::time::Instant::now();
        let e = wait_until_works(&clients, &source.current(), "u")
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(
            matches!(&e, AccessKeyError::NewKeyNeverWorked { last, .. }
                if matches!(**last, AccessKeyError::Aws { call: "sts:GetCallerIdentity", .. })),
            "{e}"
        );
        // Given up before the next wait would pass the deadline; the last try may take up to
        // one call's timeout.
        assert!(
            waited >= NEW_KEY_PATIENCE - NEW_KEY_RETRY_MAX
                && waited <= NEW_KEY_PATIENCE + CALL_TIMEOUT,
            "{waited:?}"
        );
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn retry_delays_grow_jittered_and_bounded() {
        for failures in 1..40 {
            let d = retry_delay(failures);
            let ceiling =
                (ROTATION_RETRY_FIRST * 2u32.pow((failures - 1).min(10))).min(ROTATION_RETRY_MAX);
            assert!(d >= ceiling / 2 && d <= ceiling, "{failures}: {d:?}");
        }
        assert!(retry_delay(1) <= ROTATION_RETRY_FIRST);
        assert!(retry_delay(30) >= ROTATION_RETRY_MAX / 2);
    }
}
