"""api/loop.py: uvloop that accepts every waiting connection per loop turn."""

from __future__ import annotations

import asyncio
import socket
import time

from api.loop import BatchAcceptLoop, new_event_loop


class Count(asyncio.Protocol):
    made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Count.made += 1
        transport.write(b"hi")  # type: ignore[attr-defined]


def test_a_busy_loop_accepts_every_waiting_connection_in_a_turn_or_two() -> None:
    async def main() -> tuple[int, int, bytes]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Count, "127.0.0.1", 0, backlog=512)
        port = server.sockets[0].getsockname()[1]
        turns = 0

        async def busy() -> None:  # turns of 20 ms, as in a process streaming to many readers
            nonlocal turns
            while True:
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < 0.02:
                    pass
                turns += 1
                await asyncio.sleep(0)

        clients = []
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            clients.append(s)
        spinner = asyncio.create_task(busy())
        start = turns
        while Count.made < 300 and turns - start < 500:  # noqa: ASYNC110 (counting loop turns is the point)
            await asyncio.sleep(0)
        used = turns - start
        spinner.cancel()
        await asyncio.sleep(0.05)
        clients[0].setblocking(True)
        greeting = clients[0].recv(2)
        for s in clients:
            s.close()
        server.close()
        await server.wait_closed()
        return Count.made, used, greeting

    runner = asyncio.Runner(loop_factory=new_event_loop)
    try:
        assert isinstance(runner.get_loop(), BatchAcceptLoop)
        made, turns, greeting = runner.run(main())
    finally:
        runner.close()
    # libuv alone takes one connection per turn: 300 turns. Here: all of them within a few.
    assert made == 300 and turns <= 5, (made, turns)
    assert greeting == b"hi"


def test_closing_the_server_frees_the_port() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Count, "127.0.0.1", 0)
        port: int = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return port

    runner = asyncio.Runner(loop_factory=new_event_loop)
    try:
        port = runner.run(main())
    finally:
        runner.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # nobody listens there any more
