//! SigV4 with an X.509 certificate, as IAM Roles Anywhere specifies it for CreateSession
//! (its user guide's "signing process", and aws/rolesanywhere-credential-helper's
//! `aws_signing_helper/signer.go`, which this follows line for line):
//!
//! - the algorithm is `AWS4-X509-RSA-SHA256` or `AWS4-X509-ECDSA-SHA256`, by the key's kind;
//! - `X-Amz-X509` carries the leaf (base64 DER) and `X-Amz-X509-Chain` the intermediates
//!   (base64 DER, comma-separated); both are signed, with `host`, `content-type`, `x-amz-date`;
//! - the canonical request is SigV4's, with the SHA-256 of the JSON body;
//! - the string to sign is SigV4's, its scope `<date>/<region>/rolesanywhere/aws4_request`;
//! - the signature is the key's own signature of the string to sign (RSA PKCS#1 v1.5 with
//!   SHA-256, or ECDSA with SHA-256, DER), in hex: the Go helper hands the string to
//!   `crypto.Signer.Sign(..., crypto.SHA256)`, which hashes it once and signs that hash;
//! - the `Authorization` header's credential is `<serial in decimal>/<scope>`: the serial
//!   stands where an access key id would, and only there, not in the string to sign.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

use super::key::{KeyKind, PrivateKey, SignError};

pub const SERVICE: &str = "rolesanywhere";
pub const CONTENT_TYPE: &str = "application/json";

/// Roles Anywhere's two signing algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RsaSha256,
    EcdsaSha256,
}

impl Algorithm {
    pub fn for_key(kind: KeyKind) -> Self {
        match kind {
            KeyKind::Rsa => Algorithm::RsaSha256,
            KeyKind::EcP256 | KeyKind::EcP384 => Algorithm::EcdsaSha256,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "AWS4-X509-RSA-SHA256",
            Algorithm::EcdsaSha256 => "AWS4-X509-ECDSA-SHA256",
        }
    }
}

/// The parts of a CreateSession request that the signature covers.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The `Host` header as sent: the endpoint's host, and its port when the URL names one.
    pub host: &'a str,
    pub path: &'a str,
    pub body: &'a [u8],
    pub region: &'a str,
    /// The leaf's serial number, decimal.
    pub serial: &'a str,
    pub algorithm: Algorithm,
    /// The leaf, DER.
    pub leaf: &'a [u8],
    /// The intermediates, DER.
    pub chain: &'a [Vec<u8>],
}

/// `X-Amz-Date`'s form, also the scope's date's (its first eight characters).
pub fn amz_date(now: SystemTime) -> String {
    time::OffsetDateTime::from(now)
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .expect("UTC timestamps always format")
}

/// The headers the signature covers, by lowercase name, in their canonical (sorted) order.
pub fn signed_headers(request: &Request<'_>, amz_date: &str) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("content-type", CONTENT_TYPE.to_owned()),
        ("host", request.host.to_owned()),
        ("x-amz-date", amz_date.to_owned()),
        ("x-amz-x509", BASE64.encode(request.leaf)),
    ];
    if !request.chain.is_empty() {
        let chain: Vec<String> = request.chain.iter().map(|c| BASE64.encode(c)).collect();
        headers.push(("x-amz-x509-chain", chain.join(",")));
    }
    headers
}

/// `<date>/<region>/rolesanywhere/aws4_request`.
pub fn scope(amz_date: &str, region: &str) -> String {
    format!("{}/{region}/{SERVICE}/aws4_request", &amz_date[..8])
}

/// SigV4's canonical request: method, path, (empty) query, the headers, their names, and the
/// body's SHA-256.
pub fn canonical_request(request: &Request<'_>, headers: &[(&'static str, String)]) -> String {
    let mut canonical = format!("POST\n{}\n\n", request.path);
    for (name, value) in headers {
        canonical.push_str(name);
        canonical.push(':');
        canonical.push_str(&canonical_value(value));
        canonical.push('\n');
    }
    canonical.push('\n');
    canonical.push_str(&names(headers));
    canonical.push('\n');
    canonical.push_str(&hex::encode(Sha256::digest(request.body)));
    canonical
}

/// SigV4: a header value trimmed, its runs of spaces made one.
fn canonical_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn names(headers: &[(&'static str, String)]) -> String {
    headers
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(";")
}

pub fn string_to_sign(
    algorithm: Algorithm,
    amz_date: &str,
    scope: &str,
    canonical: &str,
) -> String {
    format!(
        "{}\n{amz_date}\n{scope}\n{}",
        algorithm.name(),
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

/// The headers to send, the signed ones and `authorization`, for `request` signed at `now`.
pub fn sign(
    request: &Request<'_>,
    now: SystemTime,
    key: &PrivateKey,
) -> Result<Vec<(&'static str, String)>, SignError> {
    let date = amz_date(now);
    let scope = scope(&date, request.region);
    let mut headers = signed_headers(request, &date);
    let canonical = canonical_request(request, &headers);
    let to_sign = string_to_sign(request.algorithm, &date, &scope, &canonical);
    let signature = key.sign(to_sign.as_bytes())?;
    let authorization = format!(
        "{} Credential={}/{scope}, SignedHeaders={}, Signature={}",
        request.algorithm.name(),
        request.serial,
        names(&headers),
        hex::encode(signature)
    );
    headers.push(("authorization", authorization));
    Ok(headers)
}

#[cfg(test)]
mod tests {
    //! The expected strings were computed by iam-rolesanywhere-session 3.0.0's signer
    //! (`IAMRolesAnywhereSigner`, on botocore's SigV4 canonicalisation), from the same
    //! certificates, body and time, with its content type set to `application/json`: an
    //! implementation that shares no code with this one.

    use std::time::Duration;

    use super::*;

    const LEAF: &str = "MIIBHTCBw6ADAgECAgd+V6seXiGhMAoGCCqGSM49BAMCMAwxCjAIBgNVBAMMAWkwHhcNMjQwMTAxMDAwMDAwWhcNMjQxMjMxMDAwMDAwWjAMMQowCAYDVQQDDAFoMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEnQDbkqvBmjp3U6zOxGtJTF5hM78s3nkZEPZmIF0pblNHcehMEGxasOeZ4Yb3yogirLz1VYt8oNCkm083L1a386MQMA4wDAYDVR0TAQH/BAIwADAKBggqhkjOPQQDAgNJADBGAiEAyAZUvTsNuh09u+RZV7eOjxWJyu3AF+PmfzlXFls6I6sCIQDNJfQAXI9AA9Unix8+RWq+P/2ZiBUt4u6Jbn6h6nj+bw==";
    const CHAIN: &str = "MIIBGjCBwaADAgECAgECMAoGCCqGSM49BAMCMA0xCzAJBgNVBAMMAmNhMB4XDTI0MDEwMTAwMDAwMFoXDTI0MTIzMTAwMDAwMFowDDEKMAgGA1UEAwwBaTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABN4g0yskOl7fWi04Z61BLgh8oG1DNstg35F57UsyhZSFONnVxw7fOyYPTjSxYRfLAT1G3arL5c+y0KP8q8vHSgyjEzARMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhAOQjgSBp9TgV3vVYD1lhvGXs7TPVMnfcuCWCiixK82p7AiA27JjyoYEeUJggVyNVIwvHAi6OHiwhQK4MQtYLIYKVPQ==";
    const BODY: &[u8] = br#"{"durationSeconds":3600,"profileArn":"arn:aws:rolesanywhere:us-east-1:123456789012:profile/0a1b2c3d-0000-4000-8000-000000000002","roleArn":"arn:aws:iam::123456789012:role/imds-broker-source","trustAnchorArn":"arn:aws:rolesanywhere:us-east-1:123456789012:trust-anchor/0a1b2c3d-0000-4000-8000-000000000001"}"#;
    const SERIAL: &str = "35562239526052257";

    const CANONICAL: &str = concat!(
        "POST\n",
        "/sessions\n",
        "\n",
        "content-type:application/json\n",
        "host:rolesanywhere.us-east-1.amazonaws.com\n",
        "x-amz-date:20240102T030405Z\n",
        "x-amz-x509:MIIBHTCBw6ADAgECAgd+V6seXiGhMAoGCCqGSM49BAMCMAwxCjAIBgNVBAMMAWkwHhcNMjQwMTAxMDAwMDAwWhcNMjQxMjMxMDAwMDAwWjAMMQowCAYDVQQDDAFoMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEnQDbkqvBmjp3U6zOxGtJTF5hM78s3nkZEPZmIF0pblNHcehMEGxasOeZ4Yb3yogirLz1VYt8oNCkm083L1a386MQMA4wDAYDVR0TAQH/BAIwADAKBggqhkjOPQQDAgNJADBGAiEAyAZUvTsNuh09u+RZV7eOjxWJyu3AF+PmfzlXFls6I6sCIQDNJfQAXI9AA9Unix8+RWq+P/2ZiBUt4u6Jbn6h6nj+bw==\n",
        "x-amz-x509-chain:MIIBGjCBwaADAgECAgECMAoGCCqGSM49BAMCMA0xCzAJBgNVBAMMAmNhMB4XDTI0MDEwMTAwMDAwMFoXDTI0MTIzMTAwMDAwMFowDDEKMAgGA1UEAwwBaTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABN4g0yskOl7fWi04Z61BLgh8oG1DNstg35F57UsyhZSFONnVxw7fOyYPTjSxYRfLAT1G3arL5c+y0KP8q8vHSgyjEzARMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhAOQjgSBp9TgV3vVYD1lhvGXs7TPVMnfcuCWCiixK82p7AiA27JjyoYEeUJggVyNVIwvHAi6OHiwhQK4MQtYLIYKVPQ==\n",
        "\n",
        "content-type;host;x-amz-date;x-amz-x509;x-amz-x509-chain\n",
        "c947c688b46d073c9b7564c8100375eec5f43cf84db350c81ba4e97794192a7c",
    );
    const STRING_TO_SIGN: &str = concat!(
        "AWS4-X509-ECDSA-SHA256\n",
        "20240102T030405Z\n",
        "20240102/us-east-1/rolesanywhere/aws4_request\n",
        "50a2c658eb7ddc5857c0e06790cfa11fb0cbfe3b82f61d4f254ec7d17bebab6c",
    );

    /// 2024-01-02T03:04:05Z.
    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_164_645)
    }

    fn with<T>(f: impl FnOnce(&Request<'_>) -> T) -> T {
        let leaf = BASE64.decode(LEAF).unwrap();
        let chain = vec![BASE64.decode(CHAIN).unwrap()];
        f(&Request {
            host: "rolesanywhere.us-east-1.amazonaws.com",
            path: "/sessions",
            body: BODY,
            region: "us-east-1",
            serial: SERIAL,
            algorithm: Algorithm::EcdsaSha256,
            leaf: &leaf,
            chain: &chain,
        })
    }

    #[test]
    fn canonical_request_and_string_to_sign_match_the_reference_signer() {
        with(|request| {
            let date = amz_date(at());
            assert_eq!(date, "20240102T030405Z");
            let scope = scope(&date, request.region);
            assert_eq!(scope, "20240102/us-east-1/rolesanywhere/aws4_request");
            let canonical = canonical_request(request, &signed_headers(request, &date));
            assert_eq!(canonical, CANONICAL);
            assert_eq!(
                string_to_sign(request.algorithm, &date, &scope, &canonical),
                STRING_TO_SIGN
            );
        });
    }

    #[test]
    fn without_a_chain_its_header_is_neither_sent_nor_signed() {
        with(|request| {
            let request = Request {
                chain: &[],
                ..*request
            };
            let headers = signed_headers(&request, "20240102T030405Z");
            let names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
            assert_eq!(names, ["content-type", "host", "x-amz-date", "x-amz-x509"]);
        });
    }

    /// The whole signature: the authorization header's shape, and an ECDSA signature over the
    /// reference string to sign that the key's public half accepts.
    #[test]
    fn the_authorization_header_carries_serial_scope_names_and_signature() {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, EcdsaKeyPair, UnparsedPublicKey};
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        let key = PrivateKey::from_der(&rustls_pki_types::PrivateKeyDer::Pkcs8(
            pkcs8.as_ref().to_vec().into(),
        ))
        .unwrap();
        let headers = with(|request| sign(request, at(), &key)).unwrap();
        let (name, authorization) = headers.last().unwrap();
        assert_eq!(*name, "authorization");
        let prefix = "AWS4-X509-ECDSA-SHA256 Credential=35562239526052257/20240102/us-east-1/rolesanywhere/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-x509;x-amz-x509-chain, Signature=";
        let signature = authorization.strip_prefix(prefix).expect(authorization);
        assert!(
            signature
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key())
            .verify(STRING_TO_SIGN.as_bytes(), &hex::decode(signature).unwrap())
            .expect("the signature is over the reference string to sign");
    }

    #[test]
    fn header_values_are_trimmed_and_their_spaces_collapsed() {
        assert_eq!(canonical_value("  a   b  c "), "a b c");
    }
}
