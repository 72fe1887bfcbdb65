//! The certificate's private key, held only as the crypto library's key object: it signs the
//! string to sign and tells its public key, and its `Debug` names the kind of key, nothing more.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use p384::ecdsa::signature::hazmat::PrehashSigner;
use p384::pkcs8::DecodePrivateKey;
use rustls_pki_types::PrivateKeyDer;

/// The kinds of key Roles Anywhere's two algorithms cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Rsa => "RSA",
            KeyKind::EcP256 => "EC P-256",
            KeyKind::EcP384 => "EC P-384",
        })
    }
}

/// A private key that can sign for Roles Anywhere.
pub enum PrivateKey {
    Rsa(RsaKeyPair),
    EcP256(EcdsaKeyPair),
    /// aws-lc-rs signs P-384 only with SHA-384, and AWS's `AWS4-X509-ECDSA-SHA256` is SHA-256
    /// on every curve (the Go helper hashes with SHA-256 whatever the key), so P-384 keys go
    /// through RustCrypto's `p384`, which signs any prehash. It zeroizes the scalar on drop.
    EcP384(p384::ecdsa::SigningKey),
}

impl PrivateKey {
    /// Reads a key from its DER, in whichever of the encodings the PEM label said. The reason
    /// of an error describes the key, never quotes it.
    pub fn from_der(der: &PrivateKeyDer<'_>) -> Result<Self, String> {
        match der {
            PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der())
                .map(PrivateKey::Rsa)
                .map_err(|e| format!("not a usable RSA PRIVATE KEY (PKCS#1): {e}")),
            PrivateKeyDer::Sec1(der) => {
                let der = der.secret_sec1_der();
                if let Ok(key) = EcdsaKeyPair::from_private_key_der(
                    &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    der,
                ) {
                    return Ok(PrivateKey::EcP256(key));
                }
                p384::SecretKey::from_sec1_der(der)
                    .map(|key| PrivateKey::EcP384(key.into()))
                    .map_err(|_| "not a usable EC PRIVATE KEY (SEC1) on P-256 or P-384".to_owned())
            }
            PrivateKeyDer::Pkcs8(der) => {
                let der = der.secret_pkcs8_der();
                if let Ok(key) = RsaKeyPair::from_pkcs8(der) {
                    return Ok(PrivateKey::Rsa(key));
                }
                if let Ok(key) = EcdsaKeyPair::from_private_key_der(
                    &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    der,
                ) {
                    return Ok(PrivateKey::EcP256(key));
                }
                p384::ecdsa::SigningKey::from_pkcs8_der(der)
                    .map(PrivateKey::EcP384)
                    .map_err(|_| {
                        "not a usable PRIVATE KEY (PKCS#8): not RSA, EC P-256 or EC P-384"
                            .to_owned()
                    })
            }
            _ => Err("an unsupported kind of private key".to_owned()),
        }
    }

    pub fn kind(&self) -> KeyKind {
        match self {
            PrivateKey::Rsa(_) => KeyKind::Rsa,
            PrivateKey::EcP256(_) => KeyKind::EcP256,
            PrivateKey::EcP384(_) => KeyKind::EcP384,
        }
    }

    /// The public key as a certificate's `subjectPublicKey` holds it: the DER `RSAPublicKey`,
    /// or the uncompressed EC point.
    pub fn public_key(&self) -> Vec<u8> {
        match self {
            PrivateKey::Rsa(key) => key.public_key().as_ref().to_vec(),
            PrivateKey::EcP256(key) => key.public_key().as_ref().to_vec(),
            PrivateKey::EcP384(key) => key.verifying_key().to_sec1_point(false).as_bytes().to_vec(),
        }
    }

    /// The signature Roles Anywhere checks: RSA PKCS#1 v1.5 over SHA-256, or ECDSA over
    /// SHA-256 as DER, of `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match self {
            PrivateKey::Rsa(key) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    message,
                    &mut signature,
                )
                .map_err(|_| SignError)?;
                Ok(signature)
            }
            PrivateKey::EcP256(key) => key
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignError),
            PrivateKey::EcP384(key) => {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
                let signature: p384::ecdsa::DerSignature =
                    key.sign_prehash(digest.as_ref()).map_err(|_| SignError)?;
                Ok(signature.as_bytes().to_vec())
            }
        }
    }
}

/// The crypto library could not sign (it says no more than that).
#[derive(Debug)]
pub struct SignError;

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, <redacted>)", self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA256_ASN1, UnparsedPublicKey};
    use rustls_pki_types::{PrivatePkcs8KeyDer, PrivateSec1KeyDer};

    const MESSAGE: &[u8] = b"AWS4-X509-ECDSA-SHA256\n20240102T030405Z\n...";

    fn p256() -> PrivateKey {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        PrivateKey::from_der(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            pkcs8.as_ref().to_vec(),
        )))
        .unwrap()
    }

    fn p384() -> PrivateKey {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        PrivateKey::from_der(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            pkcs8.as_ref().to_vec(),
        )))
        .unwrap()
    }

    #[test]
    fn p256_signs_ecdsa_sha256_as_der() {
        let key = p256();
        assert_eq!(key.kind(), KeyKind::EcP256);
        let signature = key.sign(MESSAGE).unwrap();
        assert_eq!(signature[0], 0x30, "a DER SEQUENCE, not r||s");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key())
            .verify(MESSAGE, &signature)
            .unwrap();
    }

    /// RustCrypto signs, and aws-lc-rs (another implementation) checks it as P-384 with SHA-256:
    /// the hash AWS's algorithm names, not the curve's usual SHA-384.
    #[test]
    fn p384_signs_ecdsa_sha256_as_der() {
        let key = p384();
        assert_eq!(key.kind(), KeyKind::EcP384);
        let signature = key.sign(MESSAGE).unwrap();
        assert_eq!(signature[0], 0x30);
        let public = key.public_key();
        assert_eq!(public.len(), 97, "uncompressed point");
        UnparsedPublicKey::new(&ECDSA_P384_SHA256_ASN1, &public)
            .verify(MESSAGE, &signature)
            .unwrap();
        assert!(
            UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_ASN1, &public)
                .verify(MESSAGE, &signature)
                .is_err()
        );
    }

    #[test]
    fn a_sec1_p384_key_is_read() {
        let key = p384::SecretKey::from_bytes(&[7u8; 48].into()).unwrap();
        let sec1 = key.to_sec1_der().unwrap();
        let read =
            PrivateKey::from_der(&PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(sec1.to_vec())))
                .unwrap();
        assert_eq!(read.kind(), KeyKind::EcP384);
    }

    #[test]
    fn garbage_is_refused_without_being_quoted() {
        let bytes = b"\x30\x03\x02\x01\x07SECRETBYTES".to_vec();
        for der in [
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(bytes.clone())),
            PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(bytes.clone())),
            PrivateKeyDer::Pkcs1(bytes.clone().into()),
        ] {
            let err = PrivateKey::from_der(&der).unwrap_err();
            assert!(!err.contains("SECRET") && !err.contains("30 03"), "{err}");
        }
    }

    #[test]
    fn debug_names_the_kind_only() {
        let key = p256();
        assert_eq!(format!("{key:?}"), "PrivateKey(EC P-256, <redacted>)");
    }
}
