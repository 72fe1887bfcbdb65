"""Test PKI for IAM Roles Anywhere: a trust anchor CA, an intermediate, and leaf certificates
with RSA 2048, EC P-256 or EC P-384 keys, in PKCS#8 or the "traditional" encodings (PKCS#1
`RSA PRIVATE KEY`, SEC1 `EC PRIVATE KEY`).

    rolesanywhere_certs.py ca DIR
        DIR/ca.pem, DIR/ca.key (EC P-384 root), DIR/intermediate.pem, DIR/intermediate.key
        (RSA 2048, issued by the root)
    rolesanywhere_certs.py leaf CA_DIR OUT_DIR NAME --key rsa2048|p256|p384
            [--format pkcs8|traditional] [--issuer root|intermediate] [--expired] [--ec-params]
        OUT_DIR/NAME.pem (the leaf alone) and OUT_DIR/NAME.key (mode 0600); prints
        {"serial": "<decimal>", "not_after": <unix seconds>, "cn": "..."} as JSON

Every certificate is signed with SHA-256: iam-rolesanywhere-session names its algorithm after
the hash of the leaf's own signature (AWS4-X509-*-SHA256 only for SHA-256), so a test that
checks it against the verifier needs SHA-256 certificates.
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)

# What `openssl ecparam -genkey` puts before the key: an `EC PARAMETERS` block, the curve's OID.
EC_PARAMETERS = {
    "p256": "BggqhkjOPQMBBw==",
    "p384": "BgUrgQQAIg==",
}


def new_key(kind: str):
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise SystemExit(f"unknown key kind {kind!r}")


def name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imds-broker tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def issue(subject_cn, key, issuer_cert, issuer_key, *, ca: bool, not_before, not_after):
    issuer = issuer_cert.subject if issuer_cert is not None else name(subject_cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject_cn))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def key_pem(key, fmt: str) -> bytes:
    private_format = (
        serialization.PrivateFormat.PKCS8
        if fmt == "pkcs8"
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    return key.private_bytes(serialization.Encoding.PEM, private_format, serialization.NoEncryption())


def cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load(dir_: Path, stem: str):
    cert = x509.load_pem_x509_certificate((dir_ / f"{stem}.pem").read_bytes())
    key = serialization.load_pem_private_key((dir_ / f"{stem}.key").read_bytes(), password=None)
    return cert, key


def make_ca(dir_: Path) -> None:
    dir_.mkdir(parents=True, exist_ok=True)
    root_key = new_key("p384")
    root = issue("Test Trust Anchor", root_key, None, root_key, ca=True, not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    inter_key = new_key("rsa2048")
    inter = issue("Test Intermediate", inter_key, root, root_key, ca=True, not_before=NOW - DAY, not_after=NOW + 30 * DAY)
    (dir_ / "ca.pem").write_bytes(cert_pem(root))
    write_private(dir_ / "ca.key", key_pem(root_key, "pkcs8"))
    (dir_ / "intermediate.pem").write_bytes(cert_pem(inter))
    write_private(dir_ / "intermediate.key", key_pem(inter_key, "pkcs8"))


def make_leaf(args) -> None:
    ca_dir, out = Path(args.ca_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    issuer_cert, issuer_key = load(ca_dir, "ca" if args.issuer == "root" else "intermediate")
    key = new_key(args.key)
    if args.expired:
        not_before, not_after = NOW - 3 * DAY, NOW - DAY
    else:
        not_before, not_after = NOW - DAY, NOW + 7 * DAY
    cn = f"{args.name}.host.test"
    leaf = issue(cn, key, issuer_cert, issuer_key, ca=False, not_before=not_before, not_after=not_after)
    (out / f"{args.name}.pem").write_bytes(cert_pem(leaf))
    pem = key_pem(key, args.format)
    if args.ec_params:
        params = EC_PARAMETERS[args.key]
        pem = f"-----BEGIN EC PARAMETERS-----\n{params}\n-----END EC PARAMETERS-----\n".encode() + pem
    write_private(out / f"{args.name}.key", pem)
    print(
        json.dumps(
            {
                "serial": str(leaf.serial_number),
                "not_after": int(leaf.not_valid_after_utc.timestamp()),
                "cn": cn,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca")
    ca.add_argument("dir")
    leaf = sub.add_parser("leaf")
    leaf.add_argument("ca_dir")
    leaf.add_argument("out_dir")
    leaf.add_argument("name")
    leaf.add_argument("--key", required=True, choices=["rsa2048", "p256", "p384"])
    leaf.add_argument("--format", default="pkcs8", choices=["pkcs8", "traditional"])
    leaf.add_argument("--issuer", default="root", choices=["root", "intermediate"])
    leaf.add_argument("--expired", action="store_true")
    leaf.add_argument("--ec-params", action="store_true", help="an EC PARAMETERS block before the key")
    args = parser.parse_args()
    if args.command == "ca":
        make_ca(Path(args.dir))
    else:
        make_leaf(args)


if __name__ == "__main__":
    sys.exit(main())
