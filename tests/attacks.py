"""Hostile clients shared by tests/test_hostile.py and bench/soak.py. Each one
is a ledger client: what it was told is recorded in its `Sent` entry."""

from __future__ import annotations

import asyncio

from ledger import NoReply, Sent, SmtpConn


async def slow_write(conn: SmtpConn, data: bytes, gap_s: float) -> None:
    for i in range(len(data)):
        conn.writer.write(data[i : i + 1])
        await conn.writer.drain()
        await asyncio.sleep(gap_s)


async def slowloris(host: str, port: int, entry: Sent, gap_s: float = 0.01) -> None:
    """A whole transaction one byte at a time (each byte its own TCP segment)."""
    try:
        conn = await SmtpConn.open(host, port, ehlo=False)
    except NoReply as exc:
        entry.failure = str(exc)
        return
    try:
        for line in (b"EHLO slow.test\r\n", b"MAIL FROM:<slow@ledger.test>\r\n",
                     b"RCPT TO:<rcpt@ledger.test>\r\n", b"DATA\r\n"):
            await slow_write(conn, line, gap_s)
            code, text = await conn.reply()
            if code not in (250, 354):
                entry.code, entry.text = code, text
                return
        stuffed = (b"\r\n" + entry.raw).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"
        await slow_write(conn, stuffed, gap_s / 5)
        entry.code, entry.text = await conn.reply()
    except NoReply as exc:
        entry.failure = str(exc)
    finally:
        await conn.close()


async def idle_mail_holder(host: str, port: int, entry: Sent, hold_s: float) -> None:
    """MAIL FROM, then silence for `hold_s`, then the rest of the transaction."""
    try:
        conn = await SmtpConn.open(host, port)
    except NoReply as exc:
        entry.failure = str(exc)
        return
    try:
        code, text = await conn.cmd(b"MAIL FROM:<holder@ledger.test>")
        if code == 250:
            await asyncio.sleep(hold_s)
            code, text = await conn.cmd(b"RCPT TO:<rcpt@ledger.test>")
            if code == 250:
                code, text = await conn.cmd(b"DATA")
                if code == 354:
                    code, text = await conn.data(entry.raw)
        entry.code, entry.text = code, text
    except NoReply as exc:
        entry.failure = str(exc)
    finally:
        await conn.close()
