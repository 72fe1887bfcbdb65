"""A stand-in for the real EC2 IMDS, for the nftables redirect test: listens on ADDR:PORT
(inside a network namespace the test created), answers the token PUT with `real-imds-token`
and every GET with `real-imds`, so a test can tell which IMDS a client reached.

Usage: fake_ec2_imds.py ADDR PORT. Prints `listening on ADDR:PORT` once bound.
"""

import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self.answer(b"real-imds-token")

    def do_GET(self) -> None:
        self.answer(b"real-imds")

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    server = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
    host, port = server.server_address[:2]
    print(f"listening on {host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
