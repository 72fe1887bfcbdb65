//! The daemon's own credentials, the ones it calls STS with (`[source]`): the aws-config
//! default chain, IAM Roles Anywhere with an X.509 certificate, or an access key in a file the
//! daemon owns and rotates. [`Source`] is the chosen one, with its upkeep: renewed certificates
//! picked up, the key rotated, what an operator should see in `status`, metrics and `/readyz`.

pub mod access_key;
pub mod roles_anywhere;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::identity::IdentityCache;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::provider::{self, ProvideCredentials};

use crate::config::{SourceConfig, StsConfig};
use crate::shutdown::Tasks;
use crate::time::imds_time;
use access_key::{AccessKeyError, AccessKeySource, Clients};
use roles_anywhere::{RolesAnywhere, RolesAnywhereError};

/// Renewed certificate files are looked for this often (certbot and cert-manager replace
/// them in place; SIGHUP picks them up at once).
const CERTIFICATE_POLL: Duration = Duration::from_secs(60);
/// A certificate this close to its end is warned about (once a day), so there is time to renew.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// The SDK's cache asks for a new Roles Anywhere session this long before the current one
/// expires, so an app's AssumeRole never meets an expired source.
const SESSION_RENEW_AHEAD: Duration = Duration::from_secs(5 * 60);
/// How long the SDK's cache waits for a CreateSession (the client's own bound is 20 s).
const SESSION_LOAD_TIMEOUT: Duration = Duration::from_secs(25);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("[source] kind = \"roles_anywhere\": {0}")]
    RolesAnywhere(#[from] RolesAnywhereError),
    #[error("[source] kind = \"access_key\": {0}")]
    AccessKey(#[from] AccessKeyError),
}

/// The daemon's own credential source, loaded.
pub struct Source {
    kind: Kind,
    /// The last key rotation (`access_key`), for `status`.
    last_rotation: Mutex<Option<RotationStatus>>,
}

enum Kind {
    Chain,
    RolesAnywhere(Arc<RolesAnywhere>),
    AccessKey(AccessKeySource),
}

/// What `status` shows about the source.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceStatus {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<RotationStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertificateStatus {
    pub serial: String,
    pub subject_cn: Option<String>,
    pub not_after: String,
    /// Negative once expired.
    pub expires_in_secs: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RotationStatus {
    pub at: String,
    pub old_key_id: String,
    pub new_key_id: String,
}

impl Source {
    /// Reads what `config` names (certificate and key, or the key file) and checks it.
    pub fn load(config: &SourceConfig) -> Result<Self, SourceError> {
        let kind = match config {
            SourceConfig::Chain => Kind::Chain,
            SourceConfig::RolesAnywhere(ra) => {
                Kind::RolesAnywhere(Arc::new(RolesAnywhere::load(ra)?))
            }
            SourceConfig::AccessKey(ak) => Kind::AccessKey(AccessKeySource::load(ak)?),
        };
        Ok(Self {
            kind,
            last_rotation: Mutex::new(None),
        })
    }

    pub fn is_chain(&self) -> bool {
        matches!(self.kind, Kind::Chain)
    }

    /// The SDK settings STS is called with; `None` for the default chain.
    pub async fn sdk_config(&self, sts: &StsConfig) -> Option<aws_types::SdkConfig> {
        match &self.kind {
            Kind::Chain => None,
            Kind::RolesAnywhere(ra) => Some(
                aws_config::defaults(BehaviorVersion::latest())
                    .region(aws_config::Region::new(sts.region.clone()))
                    .credentials_provider(SharedCredentialsProvider::new(Shared(ra.clone())))
                    .identity_cache(
                        IdentityCache::lazy()
                            .buffer_time(SESSION_RENEW_AHEAD)
                            .load_timeout(SESSION_LOAD_TIMEOUT)
                            .build(),
                    )
                    .load()
                    .await,
            ),
            // Its own settings: no SDK cache, so a rotated key is used at once.
            Kind::AccessKey(ak) => Some(ak.sdk_config(sts)),
        }
    }

    /// When the Roles Anywhere certificate stops being valid.
    pub fn certificate_not_after(&self) -> Option<SystemTime> {
        match &self.kind {
            Kind::RolesAnywhere(ra) => Some(ra.not_after()),
            _ => None,
        }
    }

    /// Seconds until the Roles Anywhere certificate ends (negative after).
    pub fn certificate_expires_in(&self, now: SystemTime) -> Option<i64> {
        self.certificate_not_after()
            .map(|at| seconds_until(at, now))
    }

    /// Whether the source can still get credentials: not with an expired certificate.
    pub fn expired(&self, now: SystemTime) -> Option<String> {
        let not_after = self.certificate_not_after()?;
        (not_after <= now).then(|| {
            format!(
                "the source certificate expired at {}: no new Roles Anywhere session",
                imds_time(not_after)
            )
        })
    }

    pub fn status(&self, now: SystemTime) -> SourceStatus {
        let mut status = SourceStatus {
            kind: match self.kind {
                Kind::Chain => "chain",
                Kind::RolesAnywhere(_) => "roles_anywhere",
                Kind::AccessKey(_) => "access_key",
            }
            .into(),
            ..SourceStatus::default()
        };
        match &self.kind {
            Kind::Chain => {}
            Kind::RolesAnywhere(ra) => {
                let not_after = ra.not_after();
                status.certificate = Some(CertificateStatus {
                    serial: ra.serial(),
                    subject_cn: ra.subject_cn(),
                    not_after: imds_time(not_after),
                    expires_in_secs: seconds_until(not_after, now),
                });
            }
            Kind::AccessKey(ak) => {
                status.access_key_id = Some(ak.key_id());
                status.last_rotation = self
                    .last_rotation
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
            }
        }
        status
    }

    /// Re-reads the certificate and key now (SIGHUP); a broken pair keeps the old one.
    pub fn reload(&self) {
        if let Kind::RolesAnywhere(ra) = &self.kind {
            reload_pair(ra);
        }
    }

    /// The source's upkeep under `tasks`: renewed certificate files picked up and the
    /// certificate's end watched (`roles_anywhere`); leftovers of a crashed rotation removed
    /// and the key rotated every `rotate_every` (`access_key`).
    pub fn start(self: &Arc<Self>, config: &SourceConfig, sts: &StsConfig, tasks: &Tasks) {
        match (&self.kind, config) {
            (Kind::RolesAnywhere(ra), _) => {
                let ra = ra.clone();
                let stop = tasks.token().clone();
                tasks.spawn("source certificate watch", async move {
                    let mut warned_at: Option<SystemTime> = None;
                    loop {
                        if ra.files_changed() {
                            reload_pair(&ra);
                        }
                        warn_near_expiry(&ra, &mut warned_at);
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(CERTIFICATE_POLL) => {}
                        }
                    }
                });
            }
            (Kind::AccessKey(ak), SourceConfig::AccessKey(settings)) => {
                let clients = Clients::new(ak, sts);
                let every = settings.rotate_every;
                let ak = ak.clone();
                let this = Arc::clone(self);
                let stop = tasks.token().clone();
                tasks.spawn("source key upkeep", async move {
                    match ak.reconcile(&clients).await {
                        Ok(r) if !r.deleted.is_empty() => crate::audit::source_key_leftovers(&r.key_id, &r.deleted),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "the source key file's key could not be checked"),
                    }
                    let Some(every) = every else { return };
                    ak.run_rotation(
                        clients,
                        every,
                        |outcome| match outcome {
                            Ok(rotation) => {
                                crate::audit::source_key_rotated(&rotation.old_key_id, &rotation.new_key_id);
                                *this.last_rotation.lock().unwrap_or_else(PoisonError::into_inner) =
                                    Some(RotationStatus {
                                        at: imds_time(SystemTime::now()),
                                        old_key_id: rotation.old_key_id.clone(),
                                        new_key_id: rotation.new_key_id.clone(),
                                    });
                            }
                            Err(e) => crate::audit::source_key_rotation_failed(&e.to_string()),
                        },
                        stop.cancelled_owned(),
                    )
                    .await;
                });
            }
            _ => {}
        }
    }
}

/// The one loaded pair, shared by the SDK's cache and the upkeep that renews it.
#[derive(Debug)]
struct Shared(Arc<RolesAnywhere>);

impl ProvideCredentials for Shared {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        self.0.provide_credentials()
    }
}

fn reload_pair(ra: &RolesAnywhere) {
    match ra.reload() {
        Ok(r) if r.replaced => crate::audit::source_certificate_reloaded(
            &r.serial,
            r.subject_cn.as_deref(),
            &imds_time(r.not_after),
        ),
        Ok(_) => {}
        Err(e) => crate::audit::source_certificate_rejected(&e.to_string()),
    }
}

/// A warning in the log once a day from 30 days before the certificate's end.
fn warn_near_expiry(ra: &RolesAnywhere, warned_at: &mut Option<SystemTime>) {
    let now = SystemTime::now();
    let not_after = ra.not_after();
    let left = not_after.duration_since(now).unwrap_or_default();
    let due = warned_at.is_none_or(|at| {
        now.duration_since(at).unwrap_or_default() >= Duration::from_secs(24 * 3600)
    });
    if left < EXPIRY_WARNING && due {
        *warned_at = Some(now);
        tracing::warn!(
            serial = %ra.serial(),
            not_after = %imds_time(not_after),
            days_left = left.as_secs() / 86_400,
            "the source certificate expires soon: renew it (the daemon picks up new files by itself)"
        );
    }
}

fn seconds_until(at: SystemTime, now: SystemTime) -> i64 {
    match at.duration_since(now) {
        Ok(left) => left.as_secs() as i64,
        Err(past) => -(past.duration().as_secs() as i64),
    }
}
