//! IAM Roles Anywhere: temporary credentials from `CreateSession`, signed with the host's
//! X.509 certificate and private key (no long-term AWS key on the host).
//!
//! - `pair`: the certificate, chain and key files, read and checked to belong together;
//! - `key`: the private key, which signs and never prints;
//! - `sign`: SigV4 with an X.509 certificate, as Roles Anywhere specifies it;
//! - `session`: CreateSession's JSON;
//! - `client`: the HTTPS exchange, bounded in time and size;
//! - `backoff`: the pause after a failure.
//!
//! [`RolesAnywhere`] ties them together as an SDK credentials provider: put into the STS
//! client's config, the SDK's identity cache calls it again ahead of each session's expiry.

mod backoff;
mod client;
mod error;
mod key;
mod pair;
mod session;
mod sign;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use aws_credential_types::Credentials;
use aws_credential_types::provider::{self, ProvideCredentials, error::CredentialsError};

use crate::config::RolesAnywhereConfig;
use backoff::Backoff;
use client::{Client, Endpoint};
pub use error::RolesAnywhereError;
pub use key::KeyKind;
use pair::{Fingerprint, Pair, Paths};

/// The wall clock the signature's date comes from (tests move it).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The daemon's own credentials from Roles Anywhere.
pub struct RolesAnywhere {
    paths: Paths,
    trust_anchor_arn: String,
    profile_arn: String,
    role_arn: String,
    duration_seconds: u64,
    region: String,
    endpoint: Endpoint,
    client: Client,
    /// The pair sessions are signed with; a reload swaps it whole.
    pair: ArcSwap<Pair>,
    /// The files as last read, by a load or a reload, whether or not they made a good pair.
    read: Mutex<Fingerprint>,
    backoff: Mutex<Backoff>,
    clock: Clock,
}

/// A reload's outcome, for the caller's log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reloaded {
    pub serial: String,
    pub subject_cn: Option<String>,
    pub not_after: SystemTime,
    /// Whether the certificate or chain differs from the one used until now.
    pub replaced: bool,
}

impl RolesAnywhere {
    /// Reads the certificate, chain and key the config names, and checks them.
    pub fn load(config: &RolesAnywhereConfig) -> Result<Self, RolesAnywhereError> {
        Self::load_with_clock(config, Arc::new(SystemTime::now))
    }

    /// [`RolesAnywhere::load`], signing with the time `clock` tells.
    pub fn load_with_clock(
        config: &RolesAnywhereConfig,
        clock: Clock,
    ) -> Result<Self, RolesAnywhereError> {
        let endpoint = Endpoint::new(&config.region, config.endpoint_url.as_deref())?;
        let client = Client::new(&endpoint)?;
        let paths = Paths {
            certificate: config.certificate.clone(),
            chain: config.certificate_chain.clone(),
            key: config.private_key.clone(),
        };
        let (read, pair) = pair::read(&paths);
        Ok(RolesAnywhere {
            pair: ArcSwap::from_pointee(pair?),
            read: Mutex::new(read),
            paths,
            trust_anchor_arn: config.trust_anchor_arn.clone(),
            profile_arn: config.profile_arn.clone(),
            role_arn: config.role_arn.as_str().to_owned(),
            duration_seconds: config.duration.as_secs(),
            region: config.region.clone(),
            endpoint,
            client,
            backoff: Mutex::new(Backoff::default()),
            clock,
        })
    }

    /// One CreateSession, signed with the current pair; or, within the pause after a failure,
    /// that failure again without a request.
    pub async fn create_session(&self) -> Result<Credentials, RolesAnywhereError> {
        if let Err((retry_in, last)) = lock(&self.backoff).check(tokio::time::Instant::now()) {
            return Err(RolesAnywhereError::Backoff { retry_in, last });
        }
        let result = self.call().await;
        let mut backoff = lock(&self.backoff);
        match &result {
            Ok(_) => backoff.reset(),
            Err(e) => backoff.failed(tokio::time::Instant::now(), e.to_string()),
        }
        result
    }

    async fn call(&self) -> Result<Credentials, RolesAnywhereError> {
        let pair = self.pair.load_full();
        let body = session::body(
            self.duration_seconds,
            &self.profile_arn,
            &self.role_arn,
            &self.trust_anchor_arn,
        );
        let request = sign::Request {
            host: self.endpoint.host(),
            path: self.endpoint.path(),
            body: &body,
            region: &self.region,
            serial: pair.serial(),
            algorithm: sign::Algorithm::for_key(pair.key().kind()),
            leaf: pair.leaf(),
            chain: pair.chain(),
        };
        let headers = sign::sign(&request, (self.clock)(), pair.key())
            .map_err(|_| RolesAnywhereError::Sign)?;
        let answer = self.client.post(&self.endpoint, &headers, body).await?;
        if (200..300).contains(&answer.status) {
            session::credentials(&answer.body)
        } else {
            Err(RolesAnywhereError::Refused {
                status: answer.status,
                message: session::refusal_message(&answer.body),
            })
        }
    }

    /// Reads the certificate, chain and key again. A good pair is used from the next session
    /// on; a broken or mismatched one is refused and the pair in use kept, and the error says
    /// why.
    pub fn reload(&self) -> Result<Reloaded, RolesAnywhereError> {
        let (read, pair) = pair::read(&self.paths);
        *lock(&self.read) = read;
        let pair = pair?;
        let current = self.pair.load();
        let replaced = pair.leaf() != current.leaf() || pair.chain() != current.chain();
        let reloaded = Reloaded {
            serial: pair.serial().to_owned(),
            subject_cn: pair.subject_cn().map(str::to_owned),
            not_after: pair.not_after(),
            replaced,
        };
        self.pair.store(Arc::new(pair));
        if replaced {
            // The pause was for the old certificate's failures; the new one gets its chance now.
            lock(&self.backoff).reset();
        }
        Ok(reloaded)
    }

    /// Whether any of the three files differs (inode, size, mtime, ctime, mode) from when it
    /// was last read, by the load or by the last reload, good or not: poll it to notice a
    /// certbot or cert-manager renewal, then [`RolesAnywhere::reload`]. After a reload that
    /// failed, it turns true again only when the files change again.
    pub fn files_changed(&self) -> bool {
        Fingerprint::on_disk(&self.paths) != *lock(&self.read)
    }

    /// When the certificate in use expires.
    pub fn not_after(&self) -> SystemTime {
        self.pair.load().not_after()
    }

    /// The certificate's subject common name.
    pub fn subject_cn(&self) -> Option<String> {
        self.pair.load().subject_cn().map(str::to_owned)
    }

    /// The certificate's serial number, decimal (as Roles Anywhere logs it).
    pub fn serial(&self) -> String {
        self.pair.load().serial().to_owned()
    }

    /// The kind of the private key in use.
    pub fn key_kind(&self) -> KeyKind {
        self.pair.load().key().kind()
    }
}

/// A poisoned lock only means a panic elsewhere; the data (a fingerprint, a pause) stays sound.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for RolesAnywhere {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RolesAnywhere")
            .field("endpoint", &self.endpoint.url())
            .field("profile_arn", &self.profile_arn)
            .field("role_arn", &self.role_arn)
            .field("certificate", &self.paths.certificate)
            .field("private_key", &self.paths.key)
            .field("pair", &**self.pair.load())
            .finish_non_exhaustive()
    }
}

impl ProvideCredentials for RolesAnywhere {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            self.create_session().await.map_err(|e| match e {
                RolesAnywhereError::Timeout { .. } => {
                    CredentialsError::provider_timed_out(client::EXCHANGE_TIMEOUT)
                }
                other => CredentialsError::provider_error(other),
            })
        })
    }
}
