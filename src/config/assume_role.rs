//! What one app's AssumeRole call carries, built once when the config is loaded: every
//! credential request looks the cache up with it.

use std::time::Duration;

use crate::arn::RoleArn;

/// Everything that goes into one AssumeRole call. Two apps share cached credentials only when
/// every field is equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssumeRoleInput {
    pub role_arn: RoleArn,
    pub session_name: String,
    pub duration: Duration,
    pub source_identity: Option<String>,
    /// Session tags, sorted by key.
    pub tags: Vec<(String, String)>,
    /// Inline session policy, minified: the session gets the intersection of the role's
    /// permissions and this policy.
    pub policy: Option<String>,
    /// Managed policies used as session policies (`PolicyArns`), in config order.
    pub policy_arns: Vec<String>,
}
