//! An access key in a file the daemon owns (shared-credentials format), rotated by the daemon
//! itself when `rotate_every` is set.
//!
//! [`AccessKeySource`] reads the key (`file`), answers it as the credentials the daemon signs
//! STS calls with, and replaces it (`rotation`) the way `aws-vault rotate` does: a new key for
//! the key's own IAM user (`user`), proven to work, written to the file, then the old one
//! deleted. Each step leaves a file whose key works, so a crash anywhere is repaired at the
//! next start by [`AccessKeySource::reconcile`].
//!
//! The IAM user must be this daemon's alone: a key of the user that is not the one in the file
//! is taken for the leftover of a crashed rotation and deleted.

mod file;
mod rotation;
mod user;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_config::BehaviorVersion;
use aws_config::identity::IdentityCache;
use aws_credential_types::Credentials;
use aws_credential_types::provider::{self, ProvideCredentials, SharedCredentialsProvider};
use aws_types::region::Region;

pub use rotation::{Reconciled, Rotation, Step};

use self::file::CredentialsFile;
use crate::config::{AccessKeyConfig, StsConfig};
use crate::safe_dir::DirError;
use crate::secret::Secret;

/// What the SDK is told the credentials came from (it shows in its own debug logs).
const PROVIDER_NAME: &str = "imds-broker-access-key";
/// Bounds each IAM and STS call the rotation makes: a call that hangs would otherwise stall
/// the rotation loop, and with it every later rotation, for good.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// An access key: its id and its secret.
#[derive(Debug, Clone)]
struct Key {
    id: String,
    secret: Secret,
}

impl Key {
    fn credentials(&self) -> Credentials {
        // No expiry: a long-term key is good until it is deleted, and the rotation deletes it
        // only after this source has switched to the next one.
        Credentials::new(&self.id, self.secret.expose(), None, None, PROVIDER_NAME)
    }
}

/// The last characters of a key id, enough to tell keys apart in a log line or an error (how
/// aws-vault shows them) without spelling out an id the audit trail records in full.
pub fn key_hint(id: &str) -> String {
    let tail: String = id
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("…{tail}")
}

/// Why the key could not be read, used or rotated. No variant holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum AccessKeyError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: cannot write: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: is a symbolic link; name the file it leads to", path.display())]
    Symlink { path: PathBuf },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "{}: owned by uid {uid} (mode {mode:04o}); it must be the daemon's user's (uid {euid})",
        path.display()
    )]
    NotOwn {
        path: PathBuf,
        uid: u32,
        mode: u32,
        euid: u32,
    },
    #[error(
        "{}: mode {mode:04o} lets group or others read or write it, and it holds a long-term key; `chmod 600` it",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{}: {problem}", path.display())]
    Format { path: PathBuf, problem: String },
    #[error(
        "{}: holds key {found} now, not {expected} as the daemon read it; restart the daemon to use the file as it is",
        path.display()
    )]
    FileChanged {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{call}: {detail}")]
    Aws { call: &'static str, detail: String },
    #[error("the key belongs to {arn:?}, not an IAM user: only an IAM user's key can be rotated")]
    NotAUser { arn: String },
    #[error("the key signs as IAM user {found:?}, but its user was {expected:?}")]
    OtherUser { expected: String, found: String },
    #[error("IAM does not list the key {key} as one of user {user:?}'s")]
    NotListed { key: String, user: String },
    #[error("the new key {key} still did not work after {waited:?}: {last}")]
    NewKeyNeverWorked {
        key: String,
        waited: Duration,
        last: Box<AccessKeyError>,
    },
    #[error(
        "the key in the file ({key}) does not work, so no other key of the user was deleted: {source}"
    )]
    FileKeyFails {
        key: String,
        source: Box<AccessKeyError>,
    },
    #[error("refused to delete {key}: it is the key in the file")]
    WouldDeleteFileKey { key: String },
    #[error(
        "rotated from {} to {}, but the old key is still active: {source}",
        key_hint(&rotation.old_key_id),
        key_hint(&rotation.new_key_id)
    )]
    OldKeyNotDeleted {
        rotation: Rotation,
        source: Box<AccessKeyError>,
    },
    #[error("the rotation was stopped after step {step:?}")]
    Interrupted { step: Step },
}

/// The daemon's own access key: read from its file, answered to the SDK as static
/// credentials, and rotated in place. Cloning is cheap and every clone sees the same key, so
/// one clone can sit in the STS client's config while another rotates.
#[derive(Clone)]
pub struct AccessKeySource {
    inner: Arc<Inner>,
}

struct Inner {
    file: CredentialsFile,
    key: ArcSwap<Key>,
    /// One rotation or reconciliation at a time: each lists the user's keys and deletes the
    /// ones it takes for leftovers, which must not be a key the other is creating.
    changing: tokio::sync::Mutex<()>,
    iam_endpoint_url: Option<String>,
}

impl fmt::Debug for AccessKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessKeySource")
            .field("credentials_file", &self.inner.file.path())
            .field("profile", &self.inner.file.profile())
            .field("key", &key_hint(&self.inner.key.load().id))
            .finish()
    }
}

impl AccessKeySource {
    /// Reads the key of `config.profile` from `config.credentials_file`. The file must be a
    /// regular file of the daemon's user that group and others can neither read nor write, in
    /// a directory only root and the daemon's user can change.
    pub fn load(config: &AccessKeyConfig) -> Result<Self, AccessKeyError> {
        let (file, key) = CredentialsFile::open(&config.credentials_file, &config.profile)?;
        Ok(Self {
            inner: Arc::new(Inner {
                file,
                key: ArcSwap::from_pointee(key),
                changing: tokio::sync::Mutex::new(()),
                iam_endpoint_url: config.iam_endpoint_url.clone(),
            }),
        })
    }

    /// The id of the key the source answers now.
    pub fn key_id(&self) -> String {
        self.inner.key.load().id.clone()
    }

    /// A shared SDK config that signs with this source, for the daemon's STS client.
    ///
    /// Its identity cache is off: the SDK's default cache keeps credentials without an expiry
    /// for 15 minutes, and would go on signing with a key the rotation has already deleted.
    /// Reading the key is a pointer load, so there is nothing to cache.
    pub fn sdk_config(&self, sts: &StsConfig) -> aws_types::SdkConfig {
        aws_types::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(sts.region.clone()))
            .credentials_provider(SharedCredentialsProvider::new(self.clone()))
            .identity_cache(IdentityCache::no_cache())
            .build()
    }

    fn current(&self) -> Arc<Key> {
        self.inner.key.load_full()
    }
}

impl ProvideCredentials for AccessKeySource {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::ready(Ok(self.current().credentials()))
    }
}

/// The IAM and STS clients the rotation calls. IAM signs with the source's current key (so
/// with the new one once the source has switched); STS is built per key, to prove which key
/// works.
pub struct Clients {
    iam: aws_sdk_iam::Client,
    sts: aws_sdk_sts::Config,
}

impl Clients {
    /// IAM at the config's `iam_endpoint_url` (IAM's own endpoint for the STS region's
    /// partition otherwise), STS at `[sts]`'s region and endpoint.
    pub fn new(source: &AccessKeySource, sts: &StsConfig) -> Self {
        let timeouts = aws_sdk_iam::config::timeout::TimeoutConfig::builder()
            .operation_timeout(CALL_TIMEOUT)
            .build();
        let mut iam = aws_sdk_iam::Config::builder()
            .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
            .region(aws_sdk_iam::config::Region::new(sts.region.clone()))
            .credentials_provider(source.clone())
            // See `sdk_config`: a cached key would outlive its deletion.
            .identity_cache(aws_sdk_iam::config::IdentityCache::no_cache())
            .timeout_config(timeouts.clone());
        if let Some(url) = &source.inner.iam_endpoint_url {
            iam = iam.endpoint_url(url);
        }
        let mut sts_config = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new(sts.region.clone()))
            .identity_cache(aws_sdk_sts::config::IdentityCache::no_cache())
            .timeout_config(timeouts);
        if let Some(url) = &sts.endpoint_url {
            sts_config = sts_config.endpoint_url(url);
        }
        Self {
            iam: aws_sdk_iam::Client::from_conf(iam.build()),
            sts: sts_config.build(),
        }
    }

    /// STS signing with `key` alone.
    fn sts_as(&self, key: &Key) -> aws_sdk_sts::Client {
        aws_sdk_sts::Client::from_conf(
            self.sts
                .to_builder()
                .credentials_provider(key.credentials())
                .build(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_show_the_last_four_characters() {
        assert_eq!(key_hint("AKIAIOSFODNN7EXAMPLE"), "…MPLE");
        assert_eq!(key_hint("AB"), "…AB");
    }

    #[test]
    fn a_key_never_prints_its_secret() {
        let key = Key {
            id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret: Secret::new("wJalrXUtnFEMI/K7MDENG"),
        };
        let printed = format!("{key:?} {:?}", key.credentials());
        assert!(!printed.contains("wJalr"), "{printed}");
    }
}
