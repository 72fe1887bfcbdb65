"""CreateSession signed by an independent implementation, iam-rolesanywhere-session's
`IAMRolesAnywhereSigner` (on botocore's SigV4), optionally tampered with after signing: it
checks that the loopback verifier (rolesanywhere_server.py) accepts what AWS's own Python signer
makes, and refuses what it must.

    rolesanywhere_reference_client.py --endpoint http://127.0.0.1:PORT --certificate LEAF.pem
        --private-key KEY.pem [--chain CHAIN.pem] --trust-anchor-arn ARN --profile-arn ARN
        --role-arn ARN [--region us-east-1] [--tamper none|body|header|date|key]
        [--other-key KEY.pem] [--clock-offset SECONDS]

Prints {"status": N, "body": ...}. `--tamper key` signs with --other-key (not the leaf's);
`--clock-offset` moves the signer's clock. The library itself only sends over HTTPS, so the
request is signed with its signer and sent here.
"""

import argparse
import datetime
import json
import sys
import urllib.error
import urllib.request

import iam_rolesanywhere_session.iam_rolesanywhere_session as reference
from botocore.awsrequest import AWSRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--certificate", required=True)
    parser.add_argument("--private-key", required=True)
    parser.add_argument("--chain")
    parser.add_argument("--trust-anchor-arn", required=True)
    parser.add_argument("--profile-arn", required=True)
    parser.add_argument("--role-arn", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--tamper", default="none", choices=["none", "body", "header", "date", "key"])
    parser.add_argument("--other-key")
    parser.add_argument("--clock-offset", type=int, default=0)
    args = parser.parse_args()

    key = args.other_key if args.tamper == "key" else args.private_key
    signer = reference.IAMRolesAnywhereSigner(
        certificate=open(args.certificate, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(args.chain, "rb").read() if args.chain else None,
        region=args.region,
    )
    body = {
        "durationSeconds": 3600,
        "profileArn": args.profile_arn,
        "roleArn": args.role_arn,
        "trustAnchorArn": args.trust_anchor_arn,
    }
    data = json.dumps(body)
    request = AWSRequest(method="POST", url=f"{args.endpoint}/sessions", data=data)

    if args.clock_offset:
        offset = datetime.timedelta(seconds=args.clock_offset)

        class Moved(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.datetime.now(tz) + offset

        reference.datetime = Moved  # the signer reads its clock as `datetime.now(timezone.utc)`
    signer.add_auth(request)
    headers = {name: value for name, value in request.headers.items()}

    if args.tamper == "body":
        data = json.dumps({**body, "durationSeconds": 3601})
    elif args.tamper == "header":
        headers["Content-Type"] = "application/json"  # signed as application/x-amz-json-1.0
    elif args.tamper == "date":
        signed = datetime.datetime.strptime(headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        headers["X-Amz-Date"] = (signed + datetime.timedelta(seconds=1)).strftime("%Y%m%dT%H%M%SZ")

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # stay on loopback
    send = urllib.request.Request(f"{args.endpoint}/sessions", data=data.encode(), headers=headers, method="POST")
    try:
        with opener.open(send, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = text
    print(json.dumps({"status": status, "body": answer}))


if __name__ == "__main__":
    sys.exit(main())
