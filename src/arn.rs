//! IAM role ARNs: parsed once at config load so the request path never re-validates them.

use std::fmt;
use std::str::FromStr;

/// A validated `arn:<partition>:iam::<account>:role/<path/>name` ARN.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoleArn {
    full: String,
    account_id: String,
    partition: String,
    name_start: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArnError {
    #[error("must look like arn:aws:iam::123456789012:role/NAME")]
    Shape,
    #[error("account id must be 12 digits")]
    Account,
    #[error("role name must be 1-64 characters of [A-Za-z0-9+=,.@_-]")]
    RoleName,
    #[error("ARN must be 20-2048 characters (STS limit)")]
    Length,
}

impl RoleArn {
    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    pub fn partition(&self) -> &str {
        &self.partition
    }

    /// The role name without its path: what IMDS lists under `security-credentials/`.
    pub fn role_name(&self) -> &str {
        &self.full[self.name_start..]
    }
}

impl FromStr for RoleArn {
    type Err = ArnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !(20..=2048).contains(&s.len()) {
            return Err(ArnError::Length);
        }
        let mut parts = s.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(ArnError::Shape);
        };
        if !partition.starts_with("aws") {
            return Err(ArnError::Shape);
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ArnError::Account);
        }
        let Some(path_and_name) = resource.strip_prefix("role/") else {
            return Err(ArnError::Shape);
        };
        let name = path_and_name.rsplit('/').next().unwrap_or_default();
        let name_ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
        if !name_ok {
            return Err(ArnError::RoleName);
        }
        Ok(Self {
            full: s.to_owned(),
            account_id: account.to_owned(),
            partition: partition.to_owned(),
            name_start: s.len() - name.len(),
        })
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_pathed_roles() {
        let a: RoleArn = "arn:aws:iam::123456789012:role/billing".parse().unwrap();
        assert_eq!(a.role_name(), "billing");
        assert_eq!(a.account_id(), "123456789012");
        assert_eq!(a.partition(), "aws");
        let b: RoleArn = "arn:aws-cn:iam::123456789012:role/team/a/etl-job"
            .parse()
            .unwrap();
        assert_eq!(b.role_name(), "etl-job");
        assert_eq!(b.partition(), "aws-cn");
    }

    #[test]
    fn rejects_non_role_arns() {
        for (bad, why) in [
            ("arn:aws:iam::123456789012:user/bob", ArnError::Shape),
            ("arn:aws:s3:::bucket-name-is-long", ArnError::Shape),
            ("arn:aws:iam::12345:role/billing-role", ArnError::Account),
            ("arn:aws:iam::123456789012:role/", ArnError::RoleName),
            (
                "arn:aws:iam::123456789012:role/bad name",
                ArnError::RoleName,
            ),
            ("arn:aws:iam::123456789012:role/team/", ArnError::RoleName),
            ("short", ArnError::Length),
        ] {
            assert_eq!(bad.parse::<RoleArn>().unwrap_err(), why, "{bad}");
        }
    }
}
