"""A GCS-compatible server on 127.0.0.1 for the storage tests and benchmarks, and a proxy that fails requests.

``Emulator`` runs ``gcp-storage-emulator`` (pinned in requirements.txt; with the
download headers of real GCS, ``benchmarks/gcs_server.py``) as a subprocess on a free loopback port, in memory; ``FaultyProxy`` forwards HTTP
requests to it and fails a share of them (HTTP 503, a reset connection, a
stall followed by a reset), counting what it did. ``environment(url)`` gives
the variables that point gcsfs / google-cloud-storage and tensorstore at a
server.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def serving():
    """An ``Emulator`` with this process's storage clients pointed at it (``environment``); on exit the
    variables are restored and the server stopped."""
    server = Emulator()
    saved = {k: os.environ.get(k) for k in environment(server.url)}
    os.environ.update(environment(server.url))
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


class Emulator:
    """``gcp-storage-emulator`` on 127.0.0.1; ``url``; ``create_bucket(name)``; ``stop()``."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_server.py")
        # stderr to a file, never a pipe: nobody drains a pipe, and a full one blocks the server's next write
        # (it prints a traceback for every connection a client drops).
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, server, "start", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--in-memory", "-q"], stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    self.log.seek(0)
                    raise RuntimeError(f"storage emulator exited: {self.log.read().decode()[-2000:]}")
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("storage emulator did not answer within 30 s")

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=('{"name": "%s"}' % name).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 to ``upstream`` that fails a share ``rate`` of requests (after ``start_after``).

    Faults cycle through ``kinds``: ``"503"`` answers Service Unavailable, ``"reset"`` closes the
    connection without an answer, ``"stall"`` waits ``stall_s`` and then closes it. ``counts`` holds the
    requests forwarded and each fault made; ``targets`` the decoded URL and body head of every request (what
    a client asked for). ``hold(text)`` makes requests naming ``text`` wait until ``release()``; ``held``
    counts the waiting ones.
    """

    def __init__(self, upstream: str, rate: float = 0.1, seed: int = 0, kinds=("503", "reset", "stall"),
                 stall_s: float = 2.0, start_after: int = 0):
        host, port = upstream.split("://")[1].split(":")
        self.upstream = (host, int(port))
        self.rate, self.kinds, self.stall_s, self.start_after = rate, tuple(kinds), stall_s, start_after
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "forwarded": 0, **{k: 0 for k in self.kinds}}
        self._next_kind = 0
        self.targets: list[str] = []
        self.held, self._hold, self._released = 0, None, threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0], 16)
                        if n == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(n)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                target = urllib.parse.unquote(self.path) + " " + body[:512].decode("latin-1")
                with proxy.lock:
                    proxy.targets.append(target)
                if proxy._hold and proxy._hold in target:
                    with proxy.lock:
                        proxy.held += 1
                    proxy._released.wait()
                fault = proxy._decide()
                if fault == "503":
                    payload = b'{"error": {"code": 503, "message": "injected fault"}}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault in ("reset", "stall"):
                    if fault == "stall":
                        time.sleep(proxy.stall_s)
                    self.close_connection = True
                    try:
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    except OSError:
                        pass
                    self.connection.close()
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT", "PATCH") else None,
                             headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)  # a client gone after a fault is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _decide(self) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.counts["requests"] > self.start_after and self.rng.random() < self.rate:
                kind = self.kinds[self._next_kind % len(self.kinds)]
                self._next_kind += 1
                self.counts[kind] += 1
                return kind
            self.counts["forwarded"] += 1
            return None

    def hold(self, text: str) -> None:
        self._released.clear()
        self._hold = text

    def release(self) -> None:
        self._hold = None
        self._released.set()

    def failed(self) -> int:
        return sum(self.counts[k] for k in self.kinds)

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
