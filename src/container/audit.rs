//! What the container endpoint records in the audit trail (target `audit`, like every other
//! decision): credentials refused and tokens rejected (rotations are recorded by
//! [`crate::token::container`]; issuances go through
//! [`crate::audit::credentials_issued`], like the IMDS ones). Never a token or
//! a secret; a rejected token is named by nothing but the reason.

use crate::audit::{DenyReason, audit_event};
use crate::identity::Caller;

/// Why a request's token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Missing,
    Malformed,
    Unknown,
    /// A token the app had before a rotation.
    Stale,
    /// A valid token of another app than the one in the path.
    OtherApp,
    /// The token's app is no longer served on this endpoint.
    Withdrawn,
}

impl TokenRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Missing => "missing",
            TokenRefusal::Malformed => "malformed",
            TokenRefusal::Unknown => "unknown",
            TokenRefusal::Stale => "stale",
            TokenRefusal::OtherApp => "other_app",
            TokenRefusal::Withdrawn => "withdrawn",
        }
    }
}

pub fn token_rejected(caller: &Caller, refusal: TokenRefusal, app: Option<&str>) {
    metrics::counter!(crate::metrics::DENIALS, "reason" => DenyReason::BadToken.as_str())
        .increment(1);
    audit_event!(
        warn,
        "container_token.rejected",
        caller,
        endpoint = "container",
        reason = refusal.as_str(),
        app,
        "container credentials request refused"
    );
}
