"""A direct TCP link to the context cache actor's look-ups, beside its Ray methods.

Why: a Ray actor call has a fixed cost (task submission, scheduling, serialisation) larger than a look-up in
the index itself, so a look-up through a Ray method can be no faster than Ray's own round trip; a plain socket
to the actor's process removes that floor (`python -m jobs.bench_cache` measures both paths). The actor serves
the link on its own event loop (`ContextCacheActor.lookup_link`), so link look-ups run on the same thread as
every other index call and see the same entries. Inserts, stats and snapshots stay on Ray; the link only answers look-ups.

Wire format (little endian). The client first sends the 32-byte token it got from the actor through Ray. Then
each request is a header (uint32 num_rows, uint32 keys_bytes), num_rows x dim float32, and keys_bytes of JSON (a
list of str or null, one per row; none when keys_bytes is 0). Each response is a uint32 length and that many
bytes of JSON: a list with one hit per row, each a dict {"value", "similarity", "is_exact"} or null. A wrong
token or a malformed request closes the connection. The token keeps processes outside the Ray cluster out; the
bytes themselves are not encrypted (Ray's own traffic is not either, by default).

Not here: the index (`policy/context_index.py`), the actor (`context_cache.py`), and when to fall back to Ray
(the callers: `actors/decisions.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

TOKEN_BYTES = 32
MAX_ROWS = 4096  # per request; a larger header is taken as garbage and closes the connection
MAX_KEYS_BYTES = 4 << 20
_REQUEST_HEADER = struct.Struct("<II")  # num_rows, keys_bytes
_RESPONSE_HEADER = struct.Struct("<I")  # body bytes

LookupRows = Callable[[np.ndarray, "list[str | None] | None"], "list[dict[str, Any] | None]"]


class LookupLinkError(ConnectionError):
    """The link failed (refused, closed, timed out or answered garbage); the caller can use Ray instead."""


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


class _LookupProtocol(asyncio.Protocol):
    """One client connection on the server side: checks the token, then answers each complete request."""

    def __init__(self, lookup_rows: LookupRows, dim: int, token: bytes) -> None:
        self._lookup_rows = lookup_rows
        self._dim = dim
        self._token = token
        self._buffer = bytearray()
        self._is_authenticated = False
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # a uvloop transport in a Ray actor (uvloop sets TCP_NODELAY itself)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while self._answer_one():
                pass
        except Exception as error:  # a malformed request or a failed look-up: this client is cut off
            logger.warning("lookup link: closing a connection: %r", error)
            self._close()

    def _answer_one(self) -> bool:
        """Answer the first complete request in the buffer; False when there is none (yet)."""
        if not self._is_authenticated:
            if len(self._buffer) < TOKEN_BYTES:
                return False
            if not hmac.compare_digest(bytes(self._buffer[:TOKEN_BYTES]), self._token):
                raise PermissionError("wrong token")
            del self._buffer[:TOKEN_BYTES]
            self._is_authenticated = True
        if len(self._buffer) < _REQUEST_HEADER.size:
            return False
        num_rows, keys_bytes = _REQUEST_HEADER.unpack_from(self._buffer)
        if not 1 <= num_rows <= MAX_ROWS or keys_bytes > MAX_KEYS_BYTES:
            raise ValueError(f"bad request header: {num_rows} rows, {keys_bytes} key bytes")
        vector_bytes = num_rows * self._dim * 4
        end = _REQUEST_HEADER.size + vector_bytes + keys_bytes
        if len(self._buffer) < end:
            return False
        start = _REQUEST_HEADER.size
        embeddings = np.frombuffer(self._buffer, np.float32, num_rows * self._dim, start)
        embeddings = embeddings.reshape(num_rows, self._dim).copy()  # [num_rows, dim]
        keys = _parse_keys(bytes(self._buffer[start + vector_bytes : end]), num_rows) if keys_bytes else None
        del self._buffer[:end]
        body = json.dumps(self._lookup_rows(embeddings, keys)).encode()
        assert self._transport is not None
        self._transport.write(_RESPONSE_HEADER.pack(len(body)) + body)
        return True

    def _close(self) -> None:
        self._buffer.clear()
        if self._transport is not None:
            self._transport.close()


def _parse_keys(raw: bytes, num_rows: int) -> list[str | None]:
    keys = json.loads(raw)
    if not isinstance(keys, list) or len(keys) != num_rows:
        raise ValueError(f"keys must be a JSON list of {num_rows} entries")
    if not all(key is None or isinstance(key, str) for key in keys):
        raise ValueError("keys must be strings or null")
    return keys


async def start_lookup_server(
    lookup_rows: LookupRows, dim: int, host: str, token: bytes, port: int = 0
) -> asyncio.AbstractServer:
    """Serve `lookup_rows(embeddings [n, dim], keys or None) -> hits` on (host, port) from the running event
    loop; port 0 picks a free one (read it from `server.sockets[0].getsockname()`)."""
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"token must be {TOKEN_BYTES} bytes, got {len(token)}")
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _LookupProtocol(lookup_rows, dim, token), host=host, port=port)


class LookupLinkClient:
    """The calling side: one connection, opened on first use, used by one call at a time (a lock keeps
    threads from interleaving requests). Any failure closes it and raises LookupLinkError; the next call
    connects afresh."""

    def __init__(self, host: str, port: int, token: bytes, dim: int, timeout_s: float = 2.0) -> None:
        self.address = (host, port)
        self._token = token
        self._dim = dim
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_description(cls, description: dict[str, Any], timeout_s: float = 2.0) -> LookupLinkClient:
        """From what `ContextCacheActor.lookup_link()` returns: {"host", "port", "token" (hex), "dim"}."""
        return cls(
            description["host"],
            description["port"],
            bytes.fromhex(description["token"]),
            description["dim"],
            timeout_s,
        )

    def lookup(self, embedding: np.ndarray, key: str | None = None) -> dict[str, Any] | None:
        """The hit for one embedding [dim], or None."""
        return self.lookup_batch(np.asarray(embedding).reshape(1, -1), None if key is None else [key])[0]

    def lookup_batch(
        self, embeddings: np.ndarray, keys: Sequence[str | None] | None = None
    ) -> list[dict[str, Any] | None]:
        """A hit or None per row of embeddings [n, dim], answered by the actor's index."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self._dim or not 1 <= len(vectors) <= MAX_ROWS:
            raise ValueError(f"embeddings must be [1..{MAX_ROWS}, {self._dim}], got {list(vectors.shape)}")
        raw_keys = b"" if keys is None else json.dumps(list(keys)).encode()
        if keys is not None and len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} embeddings")
        request = _REQUEST_HEADER.pack(len(vectors), len(raw_keys)) + vectors.tobytes() + raw_keys
        with self._lock:
            try:
                sock = self._connected()
                sock.sendall(request)
                (length,) = _RESPONSE_HEADER.unpack(_receive(sock, _RESPONSE_HEADER.size))
                hits = json.loads(_receive(sock, length))
            except (OSError, ValueError) as error:
                self._close_locked()
                raise LookupLinkError(f"lookup link to {self.address}: {error!r}") from error
        if not isinstance(hits, list) or len(hits) != len(vectors):
            raise LookupLinkError(f"lookup link to {self.address}: a bad answer for {len(vectors)} rows")
        return hits

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self.address, timeout=self._timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(self._token)
            self._sock = sock
        return self._sock

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _receive(sock: socket.socket, num_bytes: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < num_bytes:
        chunk = sock.recv(num_bytes - len(buffer))
        if not chunk:
            raise ConnectionError("the link closed")
        buffer += chunk
    return bytes(buffer)
