"""uvloop, except that a listening socket accepts every waiting connection at once.

libuv accepts one connection per loop turn (libuv/libuv#3696: "don't accept() connections in a
loop"). That is harmless while turns are short; an API process streaming to a thousand readers has
turns of tens of milliseconds, and then it accepted ten-odd connections a second: a reader that
reconnected waited seconds in the kernel's accept queue before the process even saw its request
(measured: 61 connections accepted in 3 s with 50 ms turns; the stock asyncio loop took all 300 at
once, but costs far more per event). Here the listening socket is watched by the loop and drained
up to `backlog` connections per turn, each handed to uvloop as an accepted socket; the rest of the
loop is uvloop's.

uvicorn creates its servers with `loop.create_server(...)`; `new_event_loop` is the loop factory
it is given (`uvicorn.Config(loop="api.loop:new_event_loop")`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvloop

log = logging.getLogger("tandem.api")

# What accept() raises when the process or the system is out of something: wait, then go on.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_RETRY_ACCEPT_S = 1.0


class Listener:
    """The part of asyncio.Server that uvicorn uses: `sockets`, `close()`, `wait_closed()`."""

    def __init__(self, loop: BatchAcceptLoop, sockets: list[socket.socket], factory: Callable[[], asyncio.Protocol], backlog: int) -> None:
        self._loop, self.sockets, self._factory, self._backlog = loop, sockets, factory, backlog
        self._closed = False
        self._serving: set[asyncio.Task[Any]] = set()
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    log.error("cannot accept connections for now", extra={"error": str(e)})
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(_RETRY_ACCEPT_S, self._resume, sock)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while queued
                raise
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small SSE writes go out at once
            task = self._loop.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except Exception as e:  # a connection reset while being set up: that connection only
            log.debug("dropped a connection while accepting it", extra={"error": str(e)})
            conn.close()

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        return None


class BatchAcceptLoop(uvloop.Loop):  # type: ignore[misc]
    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        host: str | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        **kwargs: Any,
    ) -> Any:
        if ssl is not None or kwargs:  # not what tandem serves: uvloop's own server
            return await super().create_server(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs)  # type: ignore[arg-type]
        sockets = [sock] if sock is not None else _listen(host, port, backlog)
        for s in sockets:
            s.setblocking(False)
            if sock is not None:
                s.listen(backlog)
        return Listener(self, sockets, protocol_factory, backlog)


def _listen(host: str | None, port: int | None, backlog: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port or 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            s = socket.socket(family, type_, proto)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(backlog)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def new_event_loop() -> asyncio.AbstractEventLoop:
    return BatchAcceptLoop()
