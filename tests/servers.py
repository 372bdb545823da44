"""Real servers on 127.0.0.1 for tests: an HTTP image server with misbehaving routes, and moto's S3."""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ImageServer:
    """Serves files under `root` at /files/<name>, plus routes that fail the ways the web does:

    /missing/...     404                      /gone/...       410
    /error/...       500 every time            /flaky/<name>   503 on the first request per path, then the file
    /stall/...       sleeps `stall_s` before answering
    /trickle/<name>  sends headers, then one byte every 0.3 s (each read is quick, the body never ends)
    /truncated/<name> the first half of the file, as image/png
    /html/...        a text/html page          /redirect/<name> 302 to /files/<name>
    /huge/...        claims a Content-Length of 10 GB

    It counts requests per path and the most requests in flight at once (until their response starts).
    """

    def __init__(self, root: Path, stall_s: float = 5.0, delay_s: float = 0.0):
        self.root, self.stall_s, self.delay_s = Path(root), stall_s, delay_s
        self.requests: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._flaky_seen: set[str] = set()
        self._stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests[path] = server.requests.get(path, 0) + 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                # In flight until the response starts: a client that has read the whole response may
                # send its next request before this thread runs again, which is not concurrency.
                try:
                    if server.delay_s:
                        time.sleep(server.delay_s)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                try:
                    server._route(self, path)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def total_requests(self, prefix: str = "/") -> int:
        with self._lock:
            return sum(n for p, n in self.requests.items() if p.startswith(prefix))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = 0

    # -- routes --------------------------------------------------------------------------------------
    def _send(self, h, code: int, body: bytes, kind: str = "image/png", length: int | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        h.wfile.write(body)

    def _file(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def _route(self, h, path: str) -> None:
        parts = path.strip("/").split("/", 1)
        route, name = parts[0], parts[1] if len(parts) > 1 else ""
        if route == "files":
            data = self._file(name)
            self._send(h, 200, data) if data is not None else self._send(h, 404, b"no", "text/plain")
        elif route == "missing":
            self._send(h, 404, b"not found", "text/plain")
        elif route == "gone":
            self._send(h, 410, b"gone", "text/plain")
        elif route == "error":
            self._send(h, 500, b"boom", "text/plain")
        elif route == "flaky":
            with self._lock:
                first = path not in self._flaky_seen
                self._flaky_seen.add(path)
            if first:
                self._send(h, 503, b"busy", "text/plain")
            else:
                self._send(h, 200, self._file(name) or b"")
        elif route == "stall":
            self._stop.wait(self.stall_s)
            self._send(h, 200, self._file(name) or b"")
        elif route == "trickle":
            data = self._file(name) or b"x" * 100
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            for i in range(len(data)):
                if self._stop.wait(0.3):
                    return
                h.wfile.write(data[i : i + 1])
                h.wfile.flush()
        elif route == "truncated":
            data = self._file(name) or b""
            self._send(h, 200, data[: len(data) // 2])
        elif route == "html":
            self._send(h, 200, b"<html><body>not an image</body></html>", "text/html; charset=utf-8")
        elif route == "redirect":
            h.send_response(302)
            h.send_header("Location", f"/files/{name}")
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif route == "huge":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(10 * 1024**3))
            h.end_headers()
        else:
            self._send(h, 404, b"unknown route", "text/plain")


@contextlib.contextmanager
def moto_s3(bucket: str, secret: str = "raymem-test-secret-do-not-log"):
    """A moto S3 server on loopback with `bucket` created; AWS variables set while it runs (set them
    before Ray starts so that workers inherit them)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
