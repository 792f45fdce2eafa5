"""A TCP fault proxy of the suite's own, put between a client and a real redis-server.

`FaultProxy` listens on a free loopback port and forwards every connection to
the upstream server, on an asyncio loop in a thread of its own (so a test's
event loop, blocked or busy, never slows it down, and sync tests can use it
too). The test switches its mode at any time; a mode applies at once to every
connection, open or new, chunk by chunk as bytes arrive:

- ``passthrough()``: forward both ways (the start mode).
- ``delay(ms)``: hold each chunk, both ways, `ms` milliseconds before
  forwarding it (in order: a round trip costs at least twice `ms`).
- ``cut(keep=None, times=None)``: forward the client's bytes; of the next
  chunk the server sends, forward only the first `keep` bytes (default: half
  of it, so a reply is always cut inside), then close that connection, both
  sides, with a FIN. After `times` cuts (None: no end) the mode is
  passthrough again.
- ``reset()``: abort every open connection with a TCP RST (``SO_LINGER`` 0),
  and every new one as soon as it is accepted.
- ``blackhole()``: accept, keep reading, forward nothing either way (as a
  hung server or a dead path whose kernel still ACKs: no error, no answer).
  ``blackhole(after=n)`` passes `n` more server chunks first (to land the
  blackhole between a reply and the next request).
- back to ``passthrough()``: a connection that had bytes swallowed by the
  blackhole can never be resumed consistently (a reply would be missing), so
  it is reset; the others go on.

`stats` counts connections and bytes; `wait_for` / `wait_for_async` poll a
condition on them (what a test waits for instead of wall time).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

Mode = Literal["passthrough", "delay", "cut", "reset", "blackhole"]

_CHUNK = 65536


@dataclass(frozen=True)
class Stats:
    """What the proxy has done so far (a snapshot)."""

    accepted: int = 0
    """Client connections accepted."""
    open: int = 0
    """Connections open now."""
    up: int = 0
    """Bytes forwarded client -> server."""
    down: int = 0
    """Bytes forwarded server -> client."""
    swallowed_up: int = 0
    """Client bytes the blackhole swallowed."""
    swallowed_down: int = 0
    """Server bytes the blackhole swallowed."""
    cuts: int = 0
    """Replies cut (connection closed inside a reply)."""
    resets: int = 0
    """Connections aborted with an RST."""
    held: int = 0
    """Chunks held by the delay right now (not yet forwarded or dropped)."""


class _Link:
    """One client connection and its upstream connection."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.poisoned = False
        self.closed = False
        self.tasks: list[asyncio.Task[None]] = []


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort the connection of `writer` with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A fault-injecting TCP proxy to ``upstream_host:upstream_port``; see the module docstring.

    Use ``with FaultProxy(port) as proxy:`` or `start` / `stop`; `url` is a
    ``redis://`` URL through the proxy.
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self._mode: Mode = "passthrough"
        self._delay = 0.0
        self._keep: int | None = None
        self._cuts_left: int | None = None
        self._blackhole_after = 0
        self._stats = Stats()
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # lifecycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def mode(self) -> Mode:
        return self._mode

    def start(self) -> FaultProxy:
        """Listen (on a free port) and serve on a daemon thread; returns once accepting."""
        self._thread = threading.Thread(target=self._serve, name=f"faultproxy->{self.upstream[1]}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        if self._startup_error is not None:
            raise RuntimeError("the fault proxy did not start") from self._startup_error
        return self

    def stop(self) -> None:
        """Close every connection (RST) and the listener, and end the thread."""
        loop = self._loop
        if loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._accept, self.host, 0))
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:  # reported by start()
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            self._abort(link, rst=True, count=False)
        await self._server.wait_closed()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    # modes ----------------------------------------------------------------------

    def passthrough(self) -> None:
        """Forward everything; connections poisoned by a blackhole are reset."""
        self._set("passthrough")

    def delay(self, ms: float) -> None:
        """Hold each chunk, both ways, `ms` milliseconds."""
        if ms < 0:
            raise ValueError("delay must not be negative")
        self._set("delay", delay=ms / 1000)

    def cut(self, keep: int | None = None, times: int | None = None) -> None:
        """Cut the next server chunk of each connection after `keep` bytes (default half) and close it."""
        if keep is not None and keep < 0:
            raise ValueError("keep must not be negative")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        self._set("cut", keep=keep, times=times)

    def reset(self) -> None:
        """RST every open connection and every new one."""
        self._set("reset")

    def blackhole(self, after: int = 0) -> None:
        """Accept and read, never forward or answer; with `after`, only once `after` more server chunks passed."""
        if after < 0:
            raise ValueError("after must not be negative")
        if after:
            self._set("passthrough", blackhole_after=after)
        else:
            self._set("blackhole")

    def _set(
        self,
        mode: Mode,
        *,
        delay: float = 0.0,
        keep: int | None = None,
        times: int | None = None,
        blackhole_after: int = 0,
    ) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fault proxy is not running")
        future = asyncio.run_coroutine_threadsafe(self._apply(mode, delay, keep, times, blackhole_after), loop)
        future.result(10)

    async def _apply(self, mode: Mode, delay: float, keep: int | None, times: int | None, after: int) -> None:
        self._mode, self._delay, self._keep, self._cuts_left = mode, delay, keep, times
        self._blackhole_after = after
        if mode == "reset":
            for link in list(self._links):
                self._abort(link, rst=True)
        elif mode != "blackhole":
            for link in list(self._links):
                if link.poisoned:
                    self._abort(link, rst=True)

    # observing ------------------------------------------------------------------

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        return replace(self._stats, open=len(self._links))

    def wait_for(self, check: Callable[[Stats], bool], timeout: float = 10.0, what: str = "a condition") -> Stats:
        """Poll `check(stats)` until true (returns the stats); AssertionError after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            stats = self.stats
            if check(stats):
                return stats
            if time.monotonic() > end:
                raise AssertionError(f"fault proxy: no {what} within {timeout}s; {stats}")
            time.sleep(0.01)

    async def wait_for_async(
        self, check: Callable[[Stats], bool], timeout: float = 10.0, what: str = "a condition"
    ) -> Stats:
        """`wait_for` for a coroutine: sleeps on the caller's loop between polls."""
        end = time.monotonic() + timeout
        while True:
            stats = self.stats
            if check(stats):
                return stats
            if time.monotonic() > end:
                raise AssertionError(f"fault proxy: no {what} within {timeout}s; {stats}")
            await asyncio.sleep(0.01)

    def _count(self, **deltas: int) -> None:
        self._stats = replace(self._stats, **{k: getattr(self._stats, k) + v for k, v in deltas.items()})

    # forwarding -----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count(accepted=1)
        if self._mode == "reset":
            self._count(resets=1)
            _rst(writer)
            return
        try:
            server = await asyncio.open_connection(*self.upstream)
        except OSError:
            _rst(writer)
            return
        link = _Link((reader, writer), server)
        if self.mode == "reset":  # switched while connecting
            link.tasks = []
            self._links.add(link)
            self._abort(link, rst=True)
            return
        self._links.add(link)
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(self._pump(link, upstream=True)),
            loop.create_task(self._pump(link, upstream=False)),
        ]

    async def _pump(self, link: _Link, *, upstream: bool) -> None:
        source = link.client_reader if upstream else link.server_reader
        target = link.server_writer if upstream else link.client_writer
        try:
            while not link.closed:
                data = await source.read(_CHUNK)
                if not data:
                    break
                if self._mode == "delay":
                    self._count(held=1)
                    try:
                        await asyncio.sleep(self._delay)
                    finally:
                        self._count(held=-1)
                mode = self._mode
                if link.closed:
                    return
                if mode == "blackhole":
                    link.poisoned = True
                    self._count(**{"swallowed_up" if upstream else "swallowed_down": len(data)})
                    continue
                if mode == "reset":
                    self._abort(link, rst=True)
                    return
                if mode == "cut" and not upstream:
                    keep = len(data) // 2 if self._keep is None else min(self._keep, max(len(data) - 1, 0))
                    target.write(data[:keep])
                    with contextlib.suppress(OSError):
                        await target.drain()
                    self._count(down=keep, cuts=1)
                    if self._cuts_left is not None:
                        self._cuts_left -= 1
                        if self._cuts_left <= 0:
                            self._mode = "passthrough"
                    self._abort(link, rst=False)
                    return
                if not upstream and self._blackhole_after and mode == "passthrough":
                    self._blackhole_after -= 1
                    if not self._blackhole_after:  # this chunk is the last to pass
                        self._mode = "blackhole"
                target.write(data)
                await target.drain()
                self._count(**{"up" if upstream else "down": len(data)})
        except (OSError, asyncio.IncompleteReadError):
            pass
        if not link.closed:
            self._abort(link, rst=False)

    def _abort(self, link: _Link, *, rst: bool, count: bool = True) -> None:
        """Close both sides of `link`: the client with an RST (`rst`) or a FIN, the server at once."""
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        if rst:
            if count:
                self._count(resets=1)
            _rst(link.client_writer)
        else:
            link.client_writer.close()
        link.server_writer.transport.abort()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
