"""identity_probe.py for a connection that may never be made: the same arguments and the
same report, but an OSError (timeout, refused, reset) is an outcome rather than a crash,
printed as {"error": "<OSError subclass>", "message": "..."}.

Usage: attempt_probe.py [--timeout SECONDS] ENDPOINT [identity_probe.py's arguments...]

--timeout replaces identity_probe.py's per-request timeout (10 s). The hop-limit and
forged-address tests from containers use it: there, not getting through is what is checked.
"""

import json
import sys

import identity_probe  # beside this file


def main() -> int:
    if sys.argv[1:2] == ["--timeout"]:
        identity_probe.TIMEOUT_SECONDS = float(sys.argv[2])
        del sys.argv[1:3]
    try:
        return identity_probe.main()
    except OSError as err:
        json.dump({"error": type(err).__name__, "message": str(err)}, sys.stdout)
        return 0


if __name__ == "__main__":
    sys.exit(main())
