"""The look-up link without Ray: a server on an event loop in a thread, answering from a real ContextIndex."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from actors.lookup_link import LookupLinkClient, LookupLinkError, new_token, start_lookup_server
from policy.context_index import ContextIndex

DIM = 16


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def served() -> Iterator[tuple[ContextIndex, np.ndarray, str, int, bytes]]:
    """(index, vectors [40, DIM], host, port, token): entry i {"i": i} under key f"k{i}", served on a private
    event loop."""
    vectors = unit_rows(np.random.default_rng(0).standard_normal((40, DIM)))
    index = ContextIndex(dim=DIM, similarity_threshold=0.9)
    index.insert_batch(vectors, [{"i": i} for i in range(40)], [f"k{i}" for i in range(40)])

    def lookup_rows(embeddings, keys):
        return [None if hit is None else hit.to_dict() for hit in index.lookup_batch(embeddings, keys)]

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    token = new_token()
    server = asyncio.run_coroutine_threadsafe(
        start_lookup_server(lookup_rows, DIM, "127.0.0.1", token), loop
    ).result(timeout=10)
    yield index, vectors, "127.0.0.1", server.sockets[0].getsockname()[1], token
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def test_the_link_answers_what_the_index_answers(served) -> None:
    index, vectors, host, port, token = served
    client = LookupLinkClient(host, port, token, DIM)
    rng = np.random.default_rng(1)
    stored = vectors[:5]
    queries = np.concatenate([stored, unit_rows(rng.standard_normal((3, DIM)))])  # 5 hits, 3 misses
    keys = ["k7", None, None, None, None, None, None, "no-such-key"]
    expected = [None if hit is None else hit.to_dict() for hit in index.lookup_batch(queries, keys)]
    assert client.lookup_batch(queries, keys) == expected
    assert client.lookup(stored[2])["value"] == {"i": 2} and client.lookup(queries[6]) is None
    assert [hit is not None for hit in expected] == [True] * 5 + [False, False, False]
    assert expected[0]["is_exact"] and expected[0]["value"] == {"i": 7}  # the key wins over the vector
    client.close()


def test_a_wrong_token_is_refused_and_others_are_still_served(served) -> None:
    _, vectors, host, port, token = served
    intruder = LookupLinkClient(host, port, bytes(len(token)), DIM)
    with pytest.raises(LookupLinkError):
        intruder.lookup(vectors[0])
    assert LookupLinkClient(host, port, token, DIM).lookup(vectors[0])["value"] == {"i": 0}


def test_a_malformed_request_closes_only_that_connection_and_the_client_reconnects(served) -> None:
    _, vectors, host, port, token = served
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(token + struct.pack("<II", 10**6, 0))  # more rows than a request may hold
        assert raw.recv(16) == b""  # closed by the server
    client = LookupLinkClient(host, port, token, DIM)
    vector = vectors[3]
    assert client.lookup(vector)["value"] == {"i": 3}
    client._sock.close()  # the connection breaks under the client: the call fails, the next one reconnects
    with pytest.raises(LookupLinkError):
        client.lookup(vector)
    assert client.lookup(vector)["value"] == {"i": 3}


def test_bad_shapes_fail_in_the_caller(served) -> None:
    _, _, host, port, token = served
    client = LookupLinkClient(host, port, token, DIM)
    with pytest.raises(ValueError, match="embeddings must be"):
        client.lookup_batch(np.ones((2, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="2 keys for 1"):
        client.lookup_batch(np.ones((1, DIM), np.float32), ["a", "b"])


def test_nothing_listens_after_the_server_closes() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(LookupLinkError):
        LookupLinkClient("127.0.0.1", port, new_token(), DIM, timeout_s=2).lookup(np.ones(DIM, np.float32))
