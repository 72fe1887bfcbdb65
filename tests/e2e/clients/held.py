"""Run a Python script in this process, but only once released.

Usage: held.py SCRIPT [ARG...]

Prints `held` on stderr, waits for the line `go` on stdin, then runs SCRIPT as
`__main__` with ARGs in this same process: same pid, same executable (whichever python
copy runs held.py). The identity tests start clients this way so they can move them into
a cgroup (or check their pid) before the client opens any socket: a socket's cgroup is
where its creator was then.
"""

import runpy
import sys


def main() -> None:
    script, *args = sys.argv[1:]
    print("held", file=sys.stderr, flush=True)
    if sys.stdin.readline() != "go\n":
        sys.exit("held.py: stdin closed before the client was released")
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
