"""A loopback stand-in for IAM Roles Anywhere's CreateSession that verifies each request the
way AWS describes it (user guide, "authentication process" and "signing process"), and answers
a good one with credentials from STS (moto).

    rolesanywhere_server.py --trust-anchor CA.pem --trust-anchor-arn ARN --profile-arn ARN
        --role-arn ARN [--region us-east-1] (--sts-endpoint URL | --moto) [--exit-with-parent]

Prints `sts on URL` (with --moto, which serves moto's STS in this process) and then
`listening on 127.0.0.1:PORT` once it accepts connections. `--exit-with-parent`: stop when
standard input closes, so a test process that dies leaves nothing running.

POST /sessions is checked, in order: the Authorization header's shape and algorithm; the
credential scope (date, region, service, terminator); X-Amz-Date within 5 minutes of now; the
signed headers (host, x-amz-date, x-amz-x509, and x-amz-x509-chain when sent); the leaf from
X-Amz-X509 (v3, not a CA, in its validity period, its serial in the credential); the
signature over the rebuilt string to sign, with the leaf's public key (RSA PKCS#1 v1.5 or ECDSA,
SHA-256); a path from the leaf through X-Amz-X509-Chain to the trust anchor (each certificate
signed by the next, in its validity period, issuers CAs); the body's ARNs and duration. Anything
else is refused: 403 and {"message": why}. This code shares nothing with the broker's signer:
it is written from AWS's description and checked against iam-rolesanywhere-session's signer.

GET /verifier/log lists every CreateSession seen: {"serial", "ok", "reason"}.
"""

import argparse
import base64
import binascii
import datetime
import hashlib
import json
import re
import signal
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.hashes import SHA256

SERVICE = "rolesanywhere"
DATE_WINDOW = datetime.timedelta(minutes=5)
MAX_BODY = 64 * 1024
MIN_DURATION, MAX_DURATION = 900, 43200
AUTHORIZATION = re.compile(
    r"^(?P<algorithm>\S+) Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]+)$"
)
ALGORITHMS = {
    "AWS4-X509-RSA-SHA256": rsa.RSAPublicKey,
    "AWS4-X509-ECDSA-SHA256": ec.EllipticCurvePublicKey,
}


class Refusal(Exception):
    """Why a request is refused (sent back as its message)."""


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def decode_cert(value: str, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(base64.b64decode(value.strip(), validate=True))
    except (binascii.Error, ValueError) as e:
        raise Refusal(f"{what} is not a base64 DER certificate: {e}") from None


def check_validity(cert: x509.Certificate, what: str, at: datetime.datetime) -> None:
    if at < cert.not_valid_before_utc:
        raise Refusal(f"{what} is not valid yet (notBefore {cert.not_valid_before_utc})")
    if at > cert.not_valid_after_utc:
        raise Refusal(f"{what} has expired (notAfter {cert.not_valid_after_utc})")


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def canonical_query(query: str) -> str:
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)


def canonical_value(values: list[str]) -> str:
    return ",".join(" ".join(v.split()) for v in values)


class Verifier:
    def __init__(self, args, sts):
        self.anchor = x509.load_pem_x509_certificate(open(args.trust_anchor, "rb").read())
        self.trust_anchor_arn = args.trust_anchor_arn
        self.profile_arn = args.profile_arn
        self.role_arn = args.role_arn
        self.region = args.region
        self.sts = sts
        self.log: list[dict] = []
        self.lock = threading.Lock()

    def record(self, serial, ok, reason):
        with self.lock:
            self.log.append({"serial": serial, "ok": ok, "reason": reason})

    def verify(self, method, path, query, headers, body: bytes):
        """The leaf and the request body, or a Refusal."""
        auth = headers.get("Authorization")
        if not auth:
            raise Refusal("missing Authorization header")
        m = AUTHORIZATION.match(auth)
        if not m:
            raise Refusal("malformed Authorization header")
        algorithm = m["algorithm"]
        if algorithm not in ALGORITHMS:
            raise Refusal(f"unsupported signing algorithm {algorithm}")
        parts = m["credential"].split("/")
        if len(parts) != 5:
            raise Refusal("the credential is not SERIAL/DATE/REGION/SERVICE/aws4_request")
        serial, scope_date, region, service, terminator = parts
        if region != self.region or service != SERVICE or terminator != "aws4_request":
            raise Refusal(f"credential scope {'/'.join(parts[1:])} is not for {self.region}/{SERVICE}")

        amz_date = headers.get("X-Amz-Date")
        if not amz_date:
            raise Refusal("missing X-Amz-Date")
        try:
            signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
                tzinfo=datetime.timezone.utc
            )
        except ValueError:
            raise Refusal(f"X-Amz-Date {amz_date!r} is not YYYYMMDDTHHMMSSZ") from None
        if scope_date != amz_date[:8]:
            raise Refusal("the credential scope's date is not X-Amz-Date's")
        if abs(now() - signed_at) > DATE_WINDOW:
            raise Refusal(f"X-Amz-Date {amz_date} is more than 5 minutes from the server's time")

        signed = m["signed"].split(";")
        if signed != sorted(set(signed)) or any(h != h.lower() for h in signed):
            raise Refusal("SignedHeaders are not lowercase, sorted and unique")
        required = {"host", "x-amz-date", "x-amz-x509"}
        if headers.get("X-Amz-X509-Chain") is not None:
            required.add("x-amz-x509-chain")
        if not required <= set(signed):
            raise Refusal(f"SignedHeaders lack {sorted(required - set(signed))}")
        for name in signed:
            if headers.get(name) is None:
                raise Refusal(f"signed header {name} is missing")

        leaf = decode_cert(headers["X-Amz-X509"], "X-Amz-X509")
        if leaf.version != x509.Version.v3:
            raise Refusal("the signing certificate is not X.509 v3")
        if is_ca(leaf):
            raise Refusal("the signing certificate is a CA certificate")
        if serial != str(leaf.serial_number):
            raise Refusal(f"the credential's serial {serial} is not the certificate's {leaf.serial_number}")
        public_key = leaf.public_key()
        if not isinstance(public_key, ALGORITHMS[algorithm]):
            raise Refusal(f"{algorithm} does not match the certificate's key")

        canonical = "\n".join(
            [
                method,
                path,
                canonical_query(query),
                "".join(f"{name}:{canonical_value(headers.get_all(name))}\n" for name in signed),
                ";".join(signed),
                hashlib.sha256(body).hexdigest(),
            ]
        )
        string_to_sign = "\n".join(
            [
                algorithm,
                amz_date,
                f"{scope_date}/{region}/{service}/{terminator}",
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        signature = bytes.fromhex(m["signature"])
        try:
            if isinstance(public_key, rsa.RSAPublicKey):
                public_key.verify(signature, string_to_sign.encode(), padding.PKCS1v15(), SHA256())
            else:
                public_key.verify(signature, string_to_sign.encode(), ec.ECDSA(SHA256()))
        except InvalidSignature:
            raise Refusal("the signature does not match the request") from None

        at = now()
        check_validity(leaf, "the signing certificate", at)
        chain_header = headers.get("X-Amz-X509-Chain")
        chain = [decode_cert(c, "X-Amz-X509-Chain") for c in chain_header.split(",")] if chain_header else []
        self.check_path(leaf, chain, at)

        try:
            request = json.loads(body)
        except ValueError:
            raise Refusal("the body is not JSON") from None
        if not isinstance(request, dict):
            raise Refusal("the body is not a JSON object")
        for key, expected in [
            ("trustAnchorArn", self.trust_anchor_arn),
            ("profileArn", self.profile_arn),
            ("roleArn", self.role_arn),
        ]:
            if request.get(key) != expected:
                raise Refusal(f"{key} {request.get(key)!r} is not {expected!r}")
        duration = request.get("durationSeconds")
        if not isinstance(duration, int) or not MIN_DURATION <= duration <= MAX_DURATION:
            raise Refusal(f"durationSeconds {duration!r} is not in {MIN_DURATION}..{MAX_DURATION}")
        return leaf, request

    def check_path(self, leaf, chain, at):
        """A path leaf -> chain... -> trust anchor, each certificate signed by the next."""
        current, unused = leaf, list(chain)
        for _ in range(len(chain) + 1):
            if current.issuer == self.anchor.subject:
                try:
                    current.verify_directly_issued_by(self.anchor)
                except (ValueError, TypeError, InvalidSignature):
                    raise Refusal("the certificate is not signed by the trust anchor") from None
                check_validity(self.anchor, "the trust anchor", at)
                return
            issuer = next((c for c in unused if c.subject == current.issuer), None)
            if issuer is None:
                break
            unused.remove(issuer)
            try:
                current.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                raise Refusal("a certificate of the chain does not sign the one below it") from None
            if not is_ca(issuer):
                raise Refusal("an intermediate of the chain is not a CA")
            check_validity(issuer, "an intermediate of the chain", at)
            current = issuer
        raise Refusal("untrusted signing certificate: no path to the trust anchor")

    def credentials(self, leaf, request):
        serial = str(leaf.serial_number)
        assumed = self.sts.assume_role(
            RoleArn=request["roleArn"],
            RoleSessionName=f"ra-{serial}"[:64],
            DurationSeconds=request["durationSeconds"],
        )
        c = assumed["Credentials"]
        cn = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        account = request["profileArn"].split(":")[4]
        return {
            "credentialSet": [
                {
                    "assumedRoleUser": {
                        "arn": assumed["AssumedRoleUser"]["Arn"],
                        "assumedRoleId": assumed["AssumedRoleUser"]["AssumedRoleId"],
                    },
                    "credentials": {
                        "accessKeyId": c["AccessKeyId"],
                        "secretAccessKey": c["SecretAccessKey"],
                        "sessionToken": c["SessionToken"],
                        "expiration": c["Expiration"].astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    },
                    "packedPolicySize": 0,
                    "roleArn": request["roleArn"],
                    "sourceIdentity": f"CN={cn[0].value}" if cn else "",
                }
            ],
            "subjectArn": f"arn:aws:rolesanywhere:{self.region}:{account}:subject/{uuid.uuid4()}",
        }


def handler(verifier: Verifier):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # the test reads /verifier/log instead
            pass

        def reply(self, status, payload, error_type=None):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if error_type:
                self.send_header("x-amzn-ErrorType", error_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if urlsplit(self.path).path == "/verifier/log":
                with verifier.lock:
                    self.reply(200, list(verifier.log))
            else:
                self.reply(404, {"message": "not found"})

        def do_POST(self):
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                return self.reply(413, {"message": "body too large"})
            body = self.rfile.read(length)
            if url.path != "/sessions":
                return self.reply(404, {"message": f"no such path {url.path}"})
            claimed = (AUTHORIZATION.match(self.headers.get("Authorization", "")) or {"credential": ""})["credential"]
            claimed_serial = claimed.split("/")[0] or None
            try:
                leaf, request = verifier.verify("POST", url.path, url.query, self.headers, body)
            except Refusal as refusal:
                verifier.record(claimed_serial, False, str(refusal))
                return self.reply(403, {"message": str(refusal)}, "AccessDeniedException")
            try:
                answer = verifier.credentials(leaf, request)
            except Exception as e:  # STS's failure is the test's to see
                verifier.record(str(leaf.serial_number), False, f"sts: {e}")
                return self.reply(500, {"message": f"sts: {e}"})
            verifier.record(str(leaf.serial_number), True, "")
            self.reply(201, answer)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trust-anchor", required=True, help="the CA certificate (PEM)")
    parser.add_argument("--trust-anchor-arn", required=True)
    parser.add_argument("--profile-arn", required=True)
    parser.add_argument("--role-arn", required=True)
    parser.add_argument("--region", default="us-east-1")
    sts_source = parser.add_mutually_exclusive_group(required=True)
    sts_source.add_argument("--sts-endpoint")
    sts_source.add_argument("--moto", action="store_true", help="serve moto's STS in this process")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when stdin closes")
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if args.exit_with_parent:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    moto = None
    sts_endpoint = args.sts_endpoint
    if args.moto:
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto._server.server_address[:2]  # no public accessor for the bound port
        sts_endpoint = f"http://{host}:{port}"
        print(f"sts on {sts_endpoint}", flush=True)
    sts = boto3.client(
        "sts",
        endpoint_url=sts_endpoint,
        region_name=args.region,
        aws_access_key_id="AKIAROLESANYWHERETEST",
        aws_secret_access_key="roles-anywhere-verifier",
    )

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(Verifier(args, sts)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        if moto is not None:
            moto.stop()


if __name__ == "__main__":
    sys.exit(main())
