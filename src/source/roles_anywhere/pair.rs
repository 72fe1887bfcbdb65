//! The certificate, its chain and its private key, read from the files the config names and
//! checked to belong together; and which versions of those files were read, so a renewal on
//! disk can be noticed.

use std::fmt;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_cert::der::Decode;
use x509_cert::der::asn1::ObjectIdentifier;
use zeroize::Zeroizing;

use super::error::RolesAnywhereError;
use super::key::{KeyKind, PrivateKey};

/// Certificates and keys are a few KiB; a bigger file is the wrong file, and is not read whole.
const MAX_FILE_BYTES: u64 = 1 << 20;

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Where the pair lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub certificate: PathBuf,
    pub chain: Option<PathBuf>,
    pub key: PathBuf,
}

/// A leaf certificate, the intermediates that lead to the trust anchor, and the leaf's key.
pub struct Pair {
    leaf: Vec<u8>,
    chain: Vec<Vec<u8>>,
    key: PrivateKey,
    serial: String,
    not_after: SystemTime,
    subject_cn: Option<String>,
}

impl Pair {
    /// The leaf, DER.
    pub fn leaf(&self) -> &[u8] {
        &self.leaf
    }

    /// The intermediates, DER, leaf's issuer first.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// The leaf's serial number in decimal, as the credential scope carries it.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn subject_cn(&self) -> Option<&str> {
        self.subject_cn.as_deref()
    }
}

impl fmt::Debug for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pair")
            .field("serial", &self.serial)
            .field("subject_cn", &self.subject_cn)
            .field("not_after", &crate::time::imds_time(self.not_after))
            .field("chain", &self.chain.len())
            .field("key", &self.key)
            .finish()
    }
}

/// The identity of one file as it was read: a renewal that replaces it (a new inode, as
/// certbot's and cert-manager's symlink swaps make) or rewrites it (size, mtime), and a chmod
/// (ctime, mode), all change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
}

impl FileId {
    fn of(meta: &Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode(),
        }
    }
}

/// The versions of the certificate, chain and key files that were read (`None`: absent or
/// unreadable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint([Option<FileId>; 3]);

impl Fingerprint {
    /// The files as they are on disk now (following symlinks, as reading them does).
    pub fn on_disk(paths: &Paths) -> Self {
        let id = |path: &Path| std::fs::metadata(path).ok().map(|m| FileId::of(&m));
        Fingerprint([
            id(&paths.certificate),
            paths.chain.as_deref().and_then(id),
            id(&paths.key),
        ])
    }
}

/// Reads all three files (each once, checked by the metadata of the open file, not of its
/// path) and makes a pair of them. The fingerprint says what was read even when the pair is
/// refused, so a caller can wait for the files to change before trying again.
pub fn read(paths: &Paths) -> (Fingerprint, Result<Pair, RolesAnywhereError>) {
    let certificate = read_file(&paths.certificate, false);
    let chain = paths.chain.as_deref().map(|p| read_file(p, false));
    let key = read_file(&paths.key, true);
    let fingerprint = Fingerprint([certificate.id, chain.as_ref().and_then(|c| c.id), key.id]);
    let pair = (|| {
        let leaf_file = certificate.bytes?;
        let chain_file = chain.map(|c| c.bytes).transpose()?;
        let key_file = key.bytes?;
        assemble(
            paths,
            &leaf_file,
            chain_file.as_ref().map(|c| c.as_slice()),
            &key_file,
        )
    })();
    (fingerprint, pair)
}

/// One file as read: which version it was, and its bytes (or why not).
struct FileRead {
    id: Option<FileId>,
    bytes: Result<Zeroizing<Vec<u8>>, RolesAnywhereError>,
}

/// Opens `path`, and for a private key refuses one that group or others may read; then reads
/// it whole (into memory that is wiped when dropped).
fn read_file(path: &Path, private: bool) -> FileRead {
    let read_err = |source| RolesAnywhereError::Read {
        path: path.to_owned(),
        source,
    };
    let opened = File::open(path).and_then(|file| {
        let meta = file.metadata()?;
        Ok((file, meta))
    });
    let (file, meta) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            return FileRead {
                id: None,
                bytes: Err(read_err(e)),
            };
        }
    };
    let id = Some(FileId::of(&meta));
    let problem = |reason: &str| {
        let reason = reason.to_owned();
        if private {
            RolesAnywhereError::PrivateKey {
                path: path.to_owned(),
                reason,
            }
        } else {
            RolesAnywhereError::Certificate {
                path: path.to_owned(),
                reason,
            }
        }
    };
    let bytes = if !meta.is_file() {
        Err(problem("not a regular file"))
    } else if private && meta.mode() & 0o077 != 0 {
        // Whoever can read the key can sign as this host, and Roles Anywhere would believe
        // them. (The open file's mode: with certbot's symlinks, the key itself, not the link.)
        Err(RolesAnywhereError::KeyPermissions {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        })
    } else if meta.len() > MAX_FILE_BYTES {
        Err(problem("larger than 1 MiB: not a PEM certificate or key"))
    } else {
        // Room for the whole file up front, so reading never moves (and leaves behind) a copy.
        let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map(|_| bytes)
            .map_err(read_err)
    };
    FileRead { id, bytes }
}

fn assemble(
    paths: &Paths,
    leaf_file: &[u8],
    chain_file: Option<&[u8]>,
    key_file: &[u8],
) -> Result<Pair, RolesAnywhereError> {
    let cert_err = |path: &Path, reason: String| RolesAnywhereError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let mut certificates =
        pem_certificates(leaf_file).map_err(|r| cert_err(&paths.certificate, r))?;
    let leaf = certificates.remove(0);
    // certbot's fullchain.pem is the leaf followed by its intermediates: without a chain file,
    // those are the chain.
    let chain = match (&paths.chain, chain_file) {
        (Some(path), Some(bytes)) => {
            if !certificates.is_empty() {
                return Err(cert_err(
                    &paths.certificate,
                    format!(
                        "holds {} certificates, and certificate_chain is set too: it must hold the leaf alone",
                        certificates.len() + 1
                    ),
                ));
            }
            pem_certificates(bytes).map_err(|r| cert_err(path, r))?
        }
        _ => certificates,
    };
    let parsed = x509_cert::Certificate::from_der(&leaf)
        .map_err(|e| cert_err(&paths.certificate, format!("not an X.509 certificate: {e}")))?;
    for (i, der) in chain.iter().enumerate() {
        let path = paths.chain.as_deref().unwrap_or(&paths.certificate);
        x509_cert::Certificate::from_der(der).map_err(|e| {
            cert_err(
                path,
                format!("certificate {} of the chain is not X.509: {e}", i + 1),
            )
        })?;
    }
    let tbs = parsed.tbs_certificate();
    let serial = decimal_serial(tbs.serial_number().as_bytes())
        .map_err(|r| cert_err(&paths.certificate, r.to_owned()))?;
    let not_after = tbs.validity().not_after.to_system_time();
    let subject_cn = tbs
        .subject()
        .common_name()
        .ok()
        .flatten()
        .map(|cn| cn.value().into_owned());
    let (cert_kind, cert_public) =
        public_key(tbs.subject_public_key_info()).map_err(|r| cert_err(&paths.certificate, r))?;

    let key = private_key(key_file).map_err(|reason| RolesAnywhereError::PrivateKey {
        path: paths.key.clone(),
        reason,
    })?;
    let mismatch = |reason: String| RolesAnywhereError::Mismatch {
        certificate: paths.certificate.clone(),
        key: paths.key.clone(),
        reason,
    };
    if key.kind() != cert_kind {
        return Err(mismatch(format!(
            "the certificate's public key is {cert_kind}, the private key is {}",
            key.kind()
        )));
    }
    if key.public_key() != cert_public {
        return Err(mismatch("their public keys differ".to_owned()));
    }
    Ok(Pair {
        leaf,
        chain,
        key,
        serial,
        not_after,
        subject_cn,
    })
}

/// Every `CERTIFICATE` block of a PEM file, at least one.
fn pem_certificates(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let certificates = CertificateDer::pem_slice_iter(bytes)
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a readable PEM file: {e}"))?;
    if certificates.is_empty() {
        return Err("holds no PEM CERTIFICATE".to_owned());
    }
    Ok(certificates)
}

/// The first private key of a PEM file. The PEM parser's own errors are not passed on: they
/// may quote what they could not read.
fn private_key(bytes: &[u8]) -> Result<PrivateKey, String> {
    let der = PrivateKeyDer::from_pem_slice(bytes).map(Zeroizing::new);
    match der {
        Ok(der) => PrivateKey::from_der(&der),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            if bytes
                .windows(b"ENCRYPTED PRIVATE KEY".len())
                .any(|w| w == b"ENCRYPTED PRIVATE KEY")
            {
                Err("holds an encrypted private key: the daemon needs it unencrypted, in a file only it can read".to_owned())
            } else {
                Err("holds no PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY".to_owned())
            }
        }
        Err(_) => Err("not a readable PEM private key".to_owned()),
    }
}

/// The kind of a certificate's public key and its bits.
fn public_key(
    spki: &x509_cert::spki::SubjectPublicKeyInfoOwned,
) -> Result<(KeyKind, Vec<u8>), String> {
    let kind = match spki.algorithm.oid {
        RSA_ENCRYPTION => KeyKind::Rsa,
        EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
            match curve {
                Some(SECP256R1) => KeyKind::EcP256,
                Some(SECP384R1) => KeyKind::EcP384,
                Some(other) => {
                    return Err(format!(
                        "its EC public key is on curve {other}; Roles Anywhere signing here supports P-256 and P-384"
                    ));
                }
                None => return Err("its EC public key names no curve".to_owned()),
            }
        }
        other => {
            return Err(format!(
                "its public key (algorithm {other}) is neither RSA nor EC"
            ));
        }
    };
    let bits = spki
        .subject_public_key
        .as_bytes()
        .ok_or("its public key is not a whole number of bytes")?;
    Ok((kind, bits.to_vec()))
}

/// A serial number (DER INTEGER content, big-endian two's complement) in decimal, as Go's
/// `big.Int.String()` and Python's `int` print it for the credential scope.
fn decimal_serial(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        return Err("its serial number is negative, which RFC 5280 does not allow");
    }
    // Long division by ten of the base-256 digits, most significant first.
    let mut number: Vec<u8> = bytes.iter().copied().skip_while(|&b| b == 0).collect();
    let mut digits = Vec::new();
    while !number.is_empty() {
        let mut remainder = 0u32;
        let mut quotient = Vec::with_capacity(number.len());
        for &byte in &number {
            let current = remainder * 256 + u32::from(byte);
            let q = current / 10;
            remainder = current % 10;
            if !(quotient.is_empty() && q == 0) {
                quotient.push(q as u8);
            }
        }
        digits.push(b'0' + remainder as u8);
        number = quotient;
    }
    if digits.is_empty() {
        digits.push(b'0');
    }
    digits.reverse();
    Ok(String::from_utf8(digits).expect("ASCII digits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_print_in_decimal() {
        for n in [0u128, 1, 9, 10, 255, 256, 65_535, 1 << 64, u128::MAX >> 1] {
            let bytes = n.to_be_bytes();
            assert_eq!(decimal_serial(&bytes).unwrap(), n.to_string());
        }
        // A 20-octet serial, with the 0x00 DER puts before a high first byte.
        let mut twenty = vec![0u8];
        twenty.extend([0xff; 20]);
        assert_eq!(
            decimal_serial(&twenty).unwrap(),
            "1461501637330902918203684832716283019655932542975"
        );
        assert!(decimal_serial(&[0x80, 0x01]).is_err());
    }

    #[test]
    fn an_encrypted_key_is_named() {
        let pem =
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(private_key(pem).unwrap_err().contains("encrypted"));
        assert!(private_key(b"hello").unwrap_err().contains("no PEM"));
    }
}
