//! CreateSession's JSON: the request body, and the credentials out of the answer
//! (`credentialSet[0].credentials`, per the Roles Anywhere API reference).

use std::time::SystemTime;

use aws_credential_types::Credentials;
use serde::{Deserialize, Serialize};

use super::error::RolesAnywhereError;

/// The name the SDK shows for where credentials came from.
pub const PROVIDER_NAME: &str = "RolesAnywhere";
/// A refusal's message is logged; past this it is cut.
const MAX_MESSAGE_CHARS: usize = 300;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    duration_seconds: u64,
    profile_arn: &'a str,
    role_arn: &'a str,
    trust_anchor_arn: &'a str,
}

/// The request body.
pub fn body(
    duration_seconds: u64,
    profile_arn: &str,
    role_arn: &str,
    trust_anchor_arn: &str,
) -> Vec<u8> {
    serde_json::to_vec(&Body {
        duration_seconds,
        profile_arn,
        role_arn,
        trust_anchor_arn,
    })
    .expect("strings and a number serialize")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    credential_set: Vec<CredentialSet>,
}

#[derive(Deserialize)]
struct CredentialSet {
    credentials: Wire,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

/// The credentials of a 2xx answer.
pub fn credentials(body: &[u8]) -> Result<Credentials, RolesAnywhereError> {
    let bad = |reason: String| RolesAnywhereError::BadResponse { reason };
    // serde's messages can quote a value, and values here are secrets: say where, not what.
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "is not CreateSession's JSON ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let wire = answer
        .credential_set
        .into_iter()
        .next()
        .ok_or_else(|| bad("has an empty credentialSet".to_owned()))?
        .credentials;
    if wire.access_key_id.is_empty() || wire.secret_access_key.is_empty() {
        return Err(bad("has an empty access key".to_owned()));
    }
    let expiration = time::OffsetDateTime::parse(
        &wire.expiration,
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|_| {
        bad(format!(
            "has an expiration that is not an RFC 3339 time: {:?}",
            wire.expiration
        ))
    })?;
    Ok(Credentials::new(
        wire.access_key_id,
        wire.secret_access_key,
        Some(wire.session_token),
        Some(SystemTime::from(expiration)),
        PROVIDER_NAME,
    ))
}

/// What a refusal says: its JSON `message` (AWS's error shape), else its text, cut short.
pub fn refusal_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Refusal {
        #[serde(alias = "Message")]
        message: String,
    }
    let text = match serde_json::from_slice::<Refusal>(body) {
        Ok(refusal) => refusal.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    if text.is_empty() {
        return "(no message)".to_owned();
    }
    let mut cut: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_the_four_fields_in_camel_case() {
        let body = body(3600, "arn:p", "arn:r", "arn:t");
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"durationSeconds":3600,"profileArn":"arn:p","roleArn":"arn:r","trustAnchorArn":"arn:t"}"#
        );
    }

    #[test]
    fn credentials_are_read_from_the_first_set() {
        let answer = br#"{"credentialSet":[{"assumedRoleUser":{"arn":"a","assumedRoleId":"b"},
            "credentials":{"accessKeyId":"ASIAEXAMPLE","expiration":"2024-01-02T04:04:05Z",
            "secretAccessKey":"wJalrSECRET","sessionToken":"TOKEN"},"packedPolicySize":0,
            "roleArn":"r","sourceIdentity":"CN=h"}],"subjectArn":"s"}"#;
        let c = credentials(answer).unwrap();
        assert_eq!(c.access_key_id(), "ASIAEXAMPLE");
        assert_eq!(c.secret_access_key(), "wJalrSECRET");
        assert_eq!(c.session_token(), Some("TOKEN"));
        assert_eq!(
            c.expiry(),
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_704_168_245))
        );
    }

    #[test]
    fn a_bad_answer_is_described_without_its_values() {
        let answer =
            br#"{"credentialSet":[{"credentials":{"accessKeyId":"A","secretAccessKey":7}}]}"#;
        let err = credentials(answer).unwrap_err().to_string();
        assert!(err.contains("not CreateSession's JSON"), "{err}");
        let secret = br#"{"credentialSet":[{"credentials":{"accessKeyId":"A","secretAccessKey":"wJalrSECRET","sessionToken":"t","expiration":"soon"}}]}"#;
        let err = credentials(secret).unwrap_err().to_string();
        assert!(err.contains("RFC 3339") && !err.contains("wJalr"), "{err}");
        assert!(credentials(br#"{"credentialSet":[]}"#).is_err());
    }

    #[test]
    fn a_refusal_says_its_message() {
        assert_eq!(
            refusal_message(br#"{"message":"Untrusted signing certificate."}"#),
            "Untrusted signing certificate."
        );
        assert_eq!(
            refusal_message(b"<html>bad gateway</html>\n"),
            "<html>bad gateway</html>"
        );
        assert_eq!(refusal_message(b""), "(no message)");
        assert_eq!(
            refusal_message("x".repeat(1000).as_bytes()).chars().count(),
            301
        );
    }
}
