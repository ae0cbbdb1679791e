"""The access point's DATA reader (IntakeSMTP) against aiosmtpd's own behaviour, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiosmtpd.smtp import SMTP, Envelope, Session

from pecd.runtime.smtp import IntakeSMTP

PREFIX = b"Received: by test\r\n"
LIMIT = 200


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def data_prefix(self, server: SMTP, session: Session, envelope: Envelope) -> bytes:
        return PREFIX

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(envelope.original_content)
        return "250 2.0.0 OK"


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> bytes:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    async def cmd(self, text: bytes) -> bytes:
        self.writer.write(text + b"\r\n")
        return await self.reply()

    async def transaction(self, data: bytes) -> bytes:
        assert (await self.cmd(b"MAIL FROM:<a@example.test>")).startswith(b"250")
        assert (await self.cmd(b"RCPT TO:<b@example.test>")).startswith(b"250")
        assert (await self.cmd(b"DATA")).startswith(b"354")
        self.writer.write(data)
        return await self.reply()


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[Client, Recorder]]:
    """An IntakeSMTP on loopback (no TLS, no AUTH) and a client past EHLO."""
    handler = Recorder()
    server = await asyncio.get_running_loop().create_server(
        lambda: IntakeSMTP(
            handler, data_size_limit=LIMIT, decode_data=False, auth_require_tls=False
        ),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client(reader, writer)
    assert (await client.reply()).startswith(b"220")
    ehlo = await client.cmd(b"EHLO client.test")
    assert f"250-SIZE {LIMIT}".encode() in ehlo
    try:
        yield client, handler
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


def test_dot_stuffing_is_undone_and_the_prefix_comes_first() -> None:
    async def go() -> None:
        async with serving() as (client, handler):
            data = b"Subject: x\r\n\r\n..leading dot\r\n..\r\nend\r\n.\r\n"
            assert (await client.transaction(data)).startswith(b"250 2.0.0")
            assert handler.messages == [PREFIX + b"Subject: x\r\n\r\n.leading dot\r\n.\r\nend\r\n"]

    asyncio.run(go())


def test_beyond_the_limit_552_then_the_session_goes_on() -> None:
    async def go() -> None:
        async with serving() as (client, handler):
            line = b"x" * 48 + b"\r\n"  # 50 bytes
            at_limit = line * (LIMIT // len(line)) + b".\r\n"
            over = line * (LIMIT // len(line) + 1) + b".\r\n"
            reply = await client.transaction(over)
            assert reply.startswith(b"552 "), reply
            assert handler.messages == []
            assert (await client.cmd(b"NOOP")).startswith(b"250")
            assert (await client.transaction(at_limit)).startswith(b"250 2.0.0")
            assert handler.messages == [PREFIX + line * (LIMIT // len(line))]

    asyncio.run(go())


def test_a_line_too_long_gets_500_then_the_session_goes_on() -> None:
    async def go() -> None:
        async with serving() as (client, handler):
            for length in (1200, 5000):  # beyond the 1000-octet limit (RFC 5321 4.5.3.1.6)
                reply = await client.transaction(b"a" * length + b"\r\n.\r\n")
                assert reply.startswith(b"500 "), reply
            assert handler.messages == []
            assert (await client.transaction(b"ok\r\n.\r\n")).startswith(b"250 2.0.0")
            assert handler.messages == [PREFIX + b"ok\r\n"]

    asyncio.run(go())
