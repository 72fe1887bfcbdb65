//! The real credential source: STS AssumeRole through aws-sdk-sts, with the daemon's own source
//! credentials from the aws-config default chain. The SDK's own retries are off: the cache's
//! worker retries with its backoff and draws every call from the STS budget, so one policy (and
//! one count) covers them all.

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role::AssumeRoleError;
use aws_sdk_sts::types::{PolicyDescriptorType, Tag};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{AssumeRoleInput, CredentialSource, Credentials, StsError};
use crate::config::StsConfig;
use crate::secret::Secret;

/// Error codes STS (and the SDK's standard retry classifier) treat as throttling.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "SlowDown",
    "PriorRequestNotComplete",
];

/// Error codes that mean "try again later" without being throttling (STS `_retry.json`, and the
/// daemon's own source credentials expiring, which the SDK refreshes before the next call).
const TRANSIENT_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "ExpiredToken",
    "ExpiredTokenException",
];

/// A TCP connection to STS not established in this long fails the attempt at once (transient),
/// instead of using up the whole attempt (`STS_ATTEMPT_TIMEOUT`). It leaves room for two SYN
/// retransmissions (at 1 s and 3 s); it is the SDK's own default since behavior version
/// 2026-01-12, set here so that an older behavior version cannot turn it off.
pub const STS_CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);

pub struct StsSource {
    client: aws_sdk_sts::Client,
}

impl StsSource {
    /// STS with the daemon's own source credentials from the aws-config default chain.
    pub async fn new(config: &StsConfig) -> Self {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .load()
            .await;
        Self::from_shared(&shared, config.endpoint_url.as_deref())
    }

    /// STS with the credentials and region of `shared`.
    pub fn from_shared(shared: &aws_types::SdkConfig, endpoint_url: Option<&str>) -> Self {
        // The cache retries with its own backoff and budget; SDK retries would multiply them.
        // The attempt as a whole is bounded by the cache (`STS_ATTEMPT_TIMEOUT`); only the
        // connect is bounded here, so a black-holed endpoint fails before the attempt does.
        let mut builder = aws_sdk_sts::config::Builder::from(shared)
            .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_sts::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(STS_CONNECT_TIMEOUT)
                    .build(),
            );
        if let Some(url) = endpoint_url {
            builder = builder.endpoint_url(url);
        }
        Self {
            client: aws_sdk_sts::Client::from_conf(builder.build()),
        }
    }
}

impl CredentialSource for StsSource {
    fn assume_role(
        &self,
        input: AssumeRoleInput,
    ) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let request = self
            .client
            .assume_role()
            .role_arn(input.role_arn.as_str())
            .role_session_name(&input.session_name)
            .duration_seconds(input.duration.as_secs() as i32)
            .set_source_identity(input.source_identity.clone())
            .set_policy(input.policy.clone());
        let policy_arns: Vec<PolicyDescriptorType> = input
            .policy_arns
            .iter()
            .map(|arn| PolicyDescriptorType::builder().arn(arn).build())
            .collect();
        let request = if policy_arns.is_empty() {
            request
        } else {
            request.set_policy_arns(Some(policy_arns))
        };
        let tags: Result<Vec<Tag>, _> = input
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        async move {
            let request = match tags {
                Ok(tags) if !tags.is_empty() => request.set_tags(Some(tags)),
                Ok(_) => request,
                Err(e) => {
                    return Err(StsError::Refused {
                        code: "InvalidTag".into(),
                        message: e.to_string(),
                    });
                }
            };
            let out = request.send().await.map_err(classify)?;
            let c = out
                .credentials()
                .ok_or_else(|| StsError::Unusable("response has no Credentials".into()))?;
            let expiration = SystemTime::try_from(*c.expiration())
                .map_err(|_| StsError::Unusable("Expiration out of range".into()))?;
            Ok(Credentials {
                access_key_id: c.access_key_id().to_owned(),
                secret_access_key: Secret::new(c.secret_access_key()),
                session_token: Secret::new(c.session_token()),
                expiration,
                issued_at: SystemTime::now(),
                rendered: Default::default(),
            })
        }
        .boxed()
    }
}

fn classify(err: SdkError<AssumeRoleError>) -> StsError {
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or("Unknown").to_owned();
            let message = service.err().message().unwrap_or_default().to_owned();
            if THROTTLING_CODES.contains(&code.as_str()) || status == 429 {
                StsError::Throttled { code }
            } else if status >= 500 || TRANSIENT_CODES.contains(&code.as_str()) {
                StsError::Unavailable(format!("{code} (HTTP {status})"))
            } else {
                StsError::Refused { code, message }
            }
        }
        SdkError::ConstructionFailure(_) => StsError::Refused {
            code: "InvalidRequest".into(),
            message: error_chain(&err),
        },
        _ => StsError::Unavailable(error_chain(&err)),
    }
}

/// The error and its causes on one line. SDK errors carry no credential material.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
