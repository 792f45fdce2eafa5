"""The fault proxy itself (tests/faultproxy.py), in front of a real redis-server.

Each mode is checked on the wire: raw sockets see exactly the bytes, the EOF
or the RST the mode promises, and the real server (read directly) shows what
reached it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faultproxy import FaultProxy
from tests.servers import RedisServer, redis_server_available


@pytest.fixture(scope="module")
def upstream() -> Iterator[RedisServer]:
    if not redis_server_available():
        if os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false"):
            pytest.fail("SLOWBURN_REQUIRE_REAL_REDIS is set but redis-server is missing")
        pytest.skip("needs redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
def proxy(upstream: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.port) as p:
        yield p


@pytest.fixture
def direct(upstream: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=upstream.port, decode_responses=True)
    yield client
    client.close()


def through(proxy: FaultProxy) -> redis.Redis:
    """A plain client through the proxy, with no retry of its own."""
    return redis.Redis(port=proxy.port, socket_timeout=5, decode_responses=True, retry=Retry(NoBackoff(), 0))


def raw(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_passthrough_forwards_both_ways(proxy: FaultProxy, direct: redis.Redis) -> None:
    client = through(proxy)
    assert client.set("pf:k", "v") and client.get("pf:k") == "v"
    assert direct.get("pf:k") == "v"
    stats = proxy.stats
    assert stats.accepted == 1 and stats.open == 1 and stats.up > 0 and stats.down > 0
    assert stats.swallowed_up == stats.swallowed_down == stats.cuts == stats.resets == 0
    client.close()
    proxy.wait_for(lambda s: s.open == 0, what="the closed connection to be dropped")


def test_delay_holds_each_chunk_both_ways(proxy: FaultProxy) -> None:
    client = through(proxy)
    client.ping()
    proxy.delay(150)
    start = time.monotonic()
    assert client.ping()
    assert time.monotonic() - start >= 0.3, "request and reply are each held 150 ms"
    proxy.passthrough()
    assert client.ping()
    client.close()


def test_cut_forwards_part_of_a_reply_then_closes(proxy: FaultProxy, direct: redis.Redis) -> None:
    direct.set("pf:big", "x" * 10_000)
    full = len(b"$10000\r\n") + 10_000 + 2
    sock = raw(proxy)
    proxy.cut(keep=100)
    sock.sendall(b"*2\r\n$3\r\nGET\r\n$6\r\npf:big\r\n")
    got = read_until_closed(sock)  # ends with EOF: the proxy closed the connection
    assert got == b"$10000\r\n" + b"x" * 92, "exactly the first 100 bytes of the reply"
    assert len(got) < full
    sock.close()
    assert proxy.stats.cuts == 1

    # The default keeps half of the chunk: the client sees a truncated reply, then EOF.
    client = through(proxy)
    with pytest.raises(redis.ConnectionError):
        client.get("pf:big")
    client.close()


def test_cut_times_returns_to_passthrough(proxy: FaultProxy) -> None:
    proxy.cut(times=1)
    client = through(proxy)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert proxy.mode == "passthrough"
    assert client.ping(), "a new connection passes"
    client.close()


def test_reset_aborts_open_and_new_connections_with_rst(proxy: FaultProxy) -> None:
    sock = raw(proxy)
    sock.sendall(b"PING\r\n")
    assert sock.recv(100) == b"+PONG\r\n"
    proxy.reset()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # the RST may land before the write
        sock.sendall(b"PING\r\n")
        sock.recv(100)
    sock.close()
    # A new connection is accepted and reset at once: the RST can reach the
    # client's connect() itself, before the first write.
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        fresh = raw(proxy)
        try:
            fresh.sendall(b"PING\r\n")
            fresh.recv(100)
        finally:
            fresh.close()
    assert proxy.stats.resets >= 2
    proxy.passthrough()
    client = through(proxy)
    assert client.ping()
    client.close()


def test_blackhole_accepts_reads_and_never_forwards(proxy: FaultProxy, direct: redis.Redis) -> None:
    idle = through(proxy)
    idle.ping()  # connected before the blackhole and unused during it
    proxy.blackhole()
    sock = raw(proxy, timeout=0.5)  # the connect itself succeeds
    command = b"*3\r\n$3\r\nSET\r\n$5\r\npf:bh\r\n$1\r\n1\r\n"
    sock.sendall(command)
    proxy.wait_for(lambda s: s.swallowed_up >= len(command), what="the command to be swallowed")
    with pytest.raises(TimeoutError):
        sock.recv(100)
    assert direct.exists("pf:bh") == 0, "the command never reached the server"

    proxy.passthrough()
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):  # poisoned: a reply is missing, so it is reset
        sock.recv(100)
    sock.close()
    assert idle.ping(), "a connection that lost nothing goes on"
    assert direct.exists("pf:bh") == 0
    idle.close()


def test_blackhole_swallows_what_the_server_sends(proxy: FaultProxy, direct: redis.Redis) -> None:
    subscriber = through(proxy).pubsub()  # type: ignore[no-untyped-call]
    subscriber.subscribe("pf:chan")
    assert subscriber.get_message(timeout=5)["type"] == "subscribe"
    proxy.blackhole()
    assert direct.publish("pf:chan", "hello") == 1
    proxy.wait_for(lambda s: s.swallowed_down > 0, what="the message to be swallowed")
    assert subscriber.get_message(timeout=0.5) is None
    proxy.passthrough()
    with pytest.raises(redis.ConnectionError):
        subscriber.get_message(timeout=5)
    subscriber.close()


def test_blackhole_after_passes_that_many_server_chunks_first(proxy: FaultProxy) -> None:
    sock = raw(proxy)
    proxy.blackhole(after=1)
    sock.sendall(b"PING\r\n")
    assert sock.recv(100) == b"+PONG\r\n"
    assert proxy.mode == "blackhole"
    sock.settimeout(0.5)
    sock.sendall(b"PING\r\n")
    with pytest.raises(TimeoutError):
        sock.recv(100)
    sock.close()
