"""Small real servers on 127.0.0.1 for the auth tests: a misbehaving Vault, a lossy proxy.

* :func:`http_server` serves a handler function on a loopback port (threaded)
  and records every request it receives (method, path, headers, body).
* :class:`LossyProxy` forwards HTTP requests to an upstream server and, when
  told to, *loses the answer*: it forwards the request, reads the upstream's
  full response (so the upstream has acted on it), records it, and then closes
  the client's connection without a byte (``drop``) or keeps it silent until
  the client gives up (``stall``). That is a lost token response, for real.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    """One request a loopback server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    """What a handler answers."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Server:
    """A running loopback server."""

    url: str
    requests: list[Recorded]


@contextmanager
def http_server(handle: Callable[[Recorded], Answer]) -> Iterator[Server]:
    """Serve ``handle`` on a free 127.0.0.1 port until the block ends."""
    seen: list[Recorded] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = Recorded(self.command, self.path, dict(self.headers.items()), body)
            seen.append(request)
            answer = handle(request)
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # http.server's naming

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class LossyProxy:
    """An HTTP/1.1 forwarding proxy on 127.0.0.1 that can lose answers after the upstream acted.

    Each client connection carries one request (the proxy answers with
    ``Connection: close``). ``lose(n, how)`` makes the next ``n`` requests
    whose path contains ``path_part`` lose their answer; ``lost`` keeps the
    upstream's answers that the client never saw.
    """

    def __init__(self, upstream: str, *, path_part: str = "/token") -> None:
        host, port = upstream.removeprefix("http://").split("/")[0].split(":")
        self._upstream = (host, int(port))
        self._path_part = path_part
        self._lock = threading.Lock()
        self._to_lose: list[str] = []
        self._stop = threading.Event()
        self._stalled: list[socket.socket] = []
        #: Upstream answers the client never received (raw bytes).
        self.lost: list[bytes] = []
        #: Requests forwarded upstream whose path contained ``path_part``.
        self.forwarded = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def lose(self, count: int = 1, how: str = "drop") -> None:
        """Lose the next ``count`` answers: ``drop`` the connection, or ``stall`` silently."""
        with self._lock:
            self._to_lose.extend([how] * count)

    def close(self) -> None:
        """Stop accepting and close every connection held."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()
        for held in self._stalled:
            held.close()

    def __enter__(self) -> LossyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            request = _read_request(client)
            if request is None:
                client.close()
                return
            head, body = request
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            interesting = self._path_part in request_line
            upstream = socket.create_connection(self._upstream, timeout=30)
            with upstream:
                upstream.sendall(_with_close(head) + body)
                answer = _read_all(upstream)
            how = None
            if interesting:
                with self._lock:
                    self.forwarded += 1
                    how = self._to_lose.pop(0) if self._to_lose else None
            if how is None:
                client.sendall(answer)
                client.close()
                return
            self.lost.append(answer)
            if how == "stall":
                self._stalled.append(client)  # closed by close(); the client times out first
                return
            client.close()  # dropped: the client sees the connection end with no answer
        except OSError:
            client.close()


def _read_request(sock: socket.socket) -> tuple[bytes, bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head, rest


def _with_close(head: bytes) -> bytes:
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"connection:", b"keep-alive:"))
    ]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
