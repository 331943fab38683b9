"""A TCP proxy on 127.0.0.1 of the tests' own: a network fault the chaos
suite's nemesis switches on and off, or a TLS front for a server that only
speaks plaintext."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading

from tests.servers import _free_port

__all__ = ["Proxy"]


class Proxy:
    """A TCP proxy on 127.0.0.1 between the processes and one server, run on
    an event loop of its own thread, that the nemesis turns into a network
    fault: ``blackhole`` (connections stay open, nothing gets through, new
    ones are accepted and hang), ``reset`` (every open connection is reset),
    ``delay`` (each chunk waits 150 ms), then ``pass`` again.

    With ``tls`` (a server context) it is a TLS front instead: clients speak
    TLS to ``port`` and the server behind it sees plaintext, as for a broker
    (Tansu) that cannot terminate TLS itself."""

    def __init__(
        self, target: int, *, port: int | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.target = target
        self.port = port or _free_port()
        self.mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", self.port, ssl=tls), self._loop
        ).result(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._links.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._links.discard(w)
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()  # cleared while blackholed
            if self.mode == "delay":
                await asyncio.sleep(0.15)
            writer.write(data)
            await writer.drain()
        writer.close()

    def set(self, fault: str) -> None:
        def apply() -> None:
            mode = fault
            if mode == "reset":
                for w in list(self._links):
                    sock = w.get_extra_info("socket")
                    if sock is not None:  # SO_LINGER 0: close sends RST
                        with contextlib.suppress(OSError):
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
                            )
                    w.transport.abort()
                self._links.clear()
                mode = "pass"
            self.mode = mode
            if mode == "blackhole":
                self._flowing.clear()
            else:
                self._flowing.set()

        self._loop.call_soon_threadsafe(apply)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for w in list(self._links):
                w.transport.abort()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
