"""Print the caller ARN for the credentials found by boto3's default chain.

Run by the e2e suite as an unprivileged uid; the environment alone decides where
credentials (IMDS) and STS (moto) are. On failure prints `ExceptionClass: message`
to stderr and exits 1, so the suite can tell NoCredentialsError from anything else.
"""

import sys

import boto3


def main() -> int:
    try:
        identity = boto3.Session().client("sts").get_caller_identity()
    except Exception as err:  # report any failure uniformly; the test judges it
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(identity["Arn"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
