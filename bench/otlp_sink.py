"""A local OTLP/HTTP collector for `make bench` that accepts and discards: every POST (traces,
metrics, logs; http/protobuf or JSON) gets 200 with an empty body, which is an empty
Export*ServiceResponse in protobuf. It counts requests and bytes so the report can show that
spans really were exported; GET /stats returns those counts as JSON.

    python3 bench/otlp_sink.py PORT
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0


COUNTS = Counts()


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's client expects

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("content-length") or 0)
        received = self.rfile.read(length) if length else b""
        with COUNTS.lock:
            COUNTS.requests += 1
            COUNTS.bytes += len(received)
        self.send_response(200)
        self.send_header("content-type", self.headers.get("content-type") or "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        with COUNTS.lock:
            body = json.dumps({"requests": COUNTS.requests, "bytes": COUNTS.bytes}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        pass  # one line per export would only add noise to the bench's logs


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
    print(f"otlp sink listening on 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
