//! The key's own IAM user, as STS and IAM see it: which user signs with a key, the user's keys,
//! and making and deleting them. Errors carry the service's code and message, never a response
//! body (CreateAccessKey's holds a secret).

use std::time::SystemTime;

use aws_sdk_iam::config::http::HttpResponse;
use aws_sdk_iam::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use super::{AccessKeyError, Key};
use crate::secret::Secret;

/// One of the user's keys, as ListAccessKeys describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyInfo {
    pub(super) id: String,
    pub(super) created: Option<SystemTime>,
}

/// The name of the IAM user `key` belongs to (STS GetCallerIdentity, which needs no
/// permission: it answers for any key that works, and fails for one that does not).
pub(super) async fn user_of(sts: &aws_sdk_sts::Client) -> Result<String, AccessKeyError> {
    let out = sts
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| aws_error("sts:GetCallerIdentity", &e))?;
    let arn = out.arn().unwrap_or_default();
    user_name_of(arn)
        .map(str::to_owned)
        .ok_or_else(|| AccessKeyError::NotAUser {
            arn: arn.to_owned(),
        })
}

/// `arn:PARTITION:iam::ACCOUNT:user/PATH/NAME` → `NAME`. Anything else (the account's root, a
/// role session) is no IAM user whose keys the daemon could rotate.
pub(super) fn user_name_of(arn: &str) -> Option<&str> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, _partition, service, _region, _account, resource] = parts.as_slice() else {
        return None;
    };
    let path_and_name = resource.strip_prefix("user/")?;
    let name = path_and_name.rsplit('/').next()?;
    (*prefix == "arn" && *service == "iam" && !name.is_empty()).then_some(name)
}

pub(super) async fn list_keys(
    iam: &aws_sdk_iam::Client,
    user: &str,
) -> Result<Vec<KeyInfo>, AccessKeyError> {
    // IAM allows two keys per user, far below a page: no paging needed.
    let out = iam
        .list_access_keys()
        .user_name(user)
        .send()
        .await
        .map_err(|e| aws_error("iam:ListAccessKeys", &e))?;
    Ok(out
        .access_key_metadata()
        .iter()
        .filter_map(|k| {
            Some(KeyInfo {
                id: k.access_key_id()?.to_owned(),
                created: k.create_date().and_then(|d| SystemTime::try_from(*d).ok()),
            })
        })
        .collect())
}

pub(super) async fn create_key(
    iam: &aws_sdk_iam::Client,
    user: &str,
) -> Result<Key, AccessKeyError> {
    let out = iam
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .map_err(|e| aws_error("iam:CreateAccessKey", &e))?;
    let key = out.access_key().ok_or_else(|| AccessKeyError::Aws {
        call: "iam:CreateAccessKey",
        detail: "the response has no AccessKey".into(),
    })?;
    Ok(Key {
        id: key.access_key_id().to_owned(),
        secret: Secret::new(key.secret_access_key()),
    })
}

pub(super) async fn delete_key(
    iam: &aws_sdk_iam::Client,
    user: &str,
    id: &str,
) -> Result<(), AccessKeyError> {
    iam.delete_access_key()
        .user_name(user)
        .access_key_id(id)
        .send()
        .await
        .map_err(|e| aws_error("iam:DeleteAccessKey", &e))?;
    Ok(())
}

/// What went wrong in a call, for the log: the service's code, message and HTTP status when
/// it answered, the kind of failure when it did not. The response body is left out: for
/// CreateAccessKey it may hold the new secret.
fn aws_error<E>(call: &'static str, error: &SdkError<E, HttpResponse>) -> AccessKeyError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let detail = match error {
        SdkError::ServiceError(e) => {
            // The status too: it is all there is when the SDK could not read the error body.
            format!(
                "{}: {} (HTTP {})",
                e.err().code().unwrap_or("unknown error"),
                e.err().message().unwrap_or("no message"),
                e.raw().status().as_u16()
            )
        }
        SdkError::TimeoutError(_) => "timed out".to_owned(),
        // A connection failure never saw a response, so its chain holds no secret.
        SdkError::DispatchFailure(e) => match e.as_connector_error() {
            Some(e) => format!("could not send the request: {}", DisplayErrorContext(e)),
            None => "could not send the request".to_owned(),
        },
        SdkError::ResponseError(_) => "the response could not be read".to_owned(),
        SdkError::ConstructionFailure(_) => "the request could not be built".to_owned(),
        _ => "failed".to_owned(),
    };
    AccessKeyError::Aws { call, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_iam_users_arn_names_a_user() {
        for (arn, name) in [
            (
                "arn:aws:iam::123456789012:user/imds-broker",
                Some("imds-broker"),
            ),
            (
                "arn:aws-cn:iam::123456789012:user/hosts/web/imds-broker",
                Some("imds-broker"),
            ),
            ("arn:aws:iam::123456789012:root", None),
            ("arn:aws:sts::123456789012:assumed-role/r/session", None),
            ("arn:aws:iam::123456789012:user/", None),
            ("", None),
        ] {
            assert_eq!(user_name_of(arn), name, "{arn}");
        }
    }
}
