"""The mail ledger: what clients were told against what the next hop got.

Used by the hostile-input suite (tests/test_hostile.py) and `make soak`
(bench/soak.py). Every message carries a unique Message-ID; the ledger keeps
the exact bytes sent and the reply the client saw. `Ledger.check(deliveries)`
then holds triaged to the promise "mail is sacred":

- every message a client saw accepted with 250 is at the sink exactly once,
  byte-identical below the headers triaged stamps on top;
- every other message got a 4xx or 5xx that the client saw (no EOF, no
  timeout, no reset without a reply);
- nothing reaches the sink that no client sent, and nothing refused with a
  5xx reaches it anyway.

A message the client saw tempfailed (4xx) may still reach the sink (the next
hop accepted after triaged gave up waiting): SMTP allows that duplicate, the
sender retries. It is counted (`delivered_after_tempfail`), not an error.

Also here: a small raw SMTP client (`SmtpConn`), a load generator (`Load`), a
probe client that measures latency during an attack (`Probe`) and a peak-RSS
sampler over a process tree (`RssSampler`). Nothing here imports pytest.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Header fields triaged puts on top of a relayed message (config/triaged.toml [stamping]).
STAMP_FIELDS = (
    b"x-triage-category",
    b"x-triage-score",
    b"x-triage-spam",
    b"x-triage-spam-score",
    b"x-triage-model",
)
_MID = re.compile(rb"(?mi)^Message-ID:[ \t]*<([^>\r\n]+@ledger\.test)>")
_WORDS = (
    "invoice meeting build release shipping order newsletter account project review "
    "lunch report update patch deadline travel family weekend receipt offer list"
).split()
_run_ids = itertools.count(1)


def make_message(mid: str, size: int = 2048, *, seed: int = 0, extra_headers: bytes = b"") -> bytes:
    """A plausible CRLF message of about `size` bytes with Message-ID `<mid>`."""
    rng = random.Random(seed)
    head = (
        b"From: Ledger Sender <sender@ledger.test>\r\n"
        b"To: rcpt@ledger.test\r\n"
        + f"Subject: ledger {mid.split('@')[0]} {rng.choice(_WORDS)}\r\n".encode()
        + f"Message-ID: <{mid}>\r\n".encode()
        + b"Date: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
        + extra_headers
        + b"\r\n"
    )
    lines: list[bytes] = []
    n = len(head)
    while n < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(12)).encode() + b"\r\n"
        if rng.random() < 0.05:
            line = b"." + line  # dot-stuffing must round-trip
        lines.append(line)
        n += len(line)
    return head + b"".join(lines)


def split_stamp(data: bytes, names: Sequence[bytes] = STAMP_FIELDS) -> tuple[dict[bytes, bytes], bytes]:
    """(our stamped fields, the rest): peels fields named in `names` off the top."""
    fields: dict[bytes, bytes] = {}
    pos = 0
    while True:
        eol = data.find(b"\n", pos)
        if eol < 0:
            break
        name, colon, _ = data[pos:eol].partition(b":")
        if not colon or name.strip().lower() not in names:
            break
        end = eol + 1
        while data[end : end + 1] in (b" ", b"\t"):  # folded continuation lines
            nxt = data.find(b"\n", end)
            end = len(data) if nxt < 0 else nxt + 1
        fields[name.strip().lower()] = data[pos + len(name) + 1 : end].strip()
        pos = end
    return fields, data[pos:]


@dataclass
class Sent:
    mid: str
    raw: bytes  # a long run may drop it once sent (`Load(keep_raw=False)`): the digest stays
    code: int | None = None  # the final reply the client saw; None: none seen
    text: str = ""
    failure: str = ""  # "eof", "timeout", "reset", ... when no reply came
    latency_s: float = 0.0
    digest: bytes = b""
    created: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(self.raw).digest()


@dataclass(frozen=True)
class Seen:
    """One copy at the sink, reduced to what the ledger compares."""

    digest: bytes  # of the message below our stamp
    stamped: bool


@dataclass
class LedgerReport:
    sent: int = 0
    accepted: int = 0
    delivered: int = 0  # distinct ledger messages at the sink
    tempfailed: int = 0
    rejected: int = 0
    unanswered: list[str] = field(default_factory=list)  # no reply seen: broken promise
    lost: list[str] = field(default_factory=list)  # 250 but not at the sink
    duplicated: list[str] = field(default_factory=list)  # 250 and at the sink more than once
    altered: list[str] = field(default_factory=list)  # at the sink, not byte-identical below our stamp
    unstamped: list[str] = field(default_factory=list)  # accepted and delivered without a category
    delivered_after_tempfail: list[str] = field(default_factory=list)  # allowed (sender retries)
    delivered_after_reject: list[str] = field(default_factory=list)  # 5xx told, delivered anyway
    phantom: list[str] = field(default_factory=list)  # at the sink, never sent by a ledger client
    foreign: int = 0  # deliveries without a ledger Message-ID (tests judge these themselves)
    replies: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # of the 250s

    @property
    def errors(self) -> dict[str, list[str]]:
        """The broken promises, by kind (empty when the ledger balances)."""
        kinds = {
            "unanswered": self.unanswered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "altered": self.altered,
            "delivered_after_reject": self.delivered_after_reject,
            "phantom": self.phantom,
        }
        return {k: v for k, v in kinds.items() if v}

    def p99_ms(self) -> float:
        return percentile(self.latencies_s, 0.99) * 1000

    def summary(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "accepted": self.accepted,
            "delivered": self.delivered,
            "tempfailed": self.tempfailed,
            "rejected": self.rejected,
            "unanswered": len(self.unanswered),
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "altered": len(self.altered),
            "unstamped": len(self.unstamped),
            "delivered_after_tempfail": len(self.delivered_after_tempfail),
            "delivered_after_reject": len(self.delivered_after_reject),
            "phantom": len(self.phantom),
            "foreign": self.foreign,
            "replies": dict(sorted(self.replies.items())),
            "p50_ms": round(percentile(self.latencies_s, 0.5) * 1000, 2),
            "p99_ms": round(self.p99_ms(), 2),
        }

    def assert_balanced(self, *, unstamped_ok: bool = True) -> None:
        errors = self.errors
        if not unstamped_ok and self.unstamped:
            errors = {**errors, "unstamped": self.unstamped}
        if errors:
            shown = {k: v[:5] for k, v in errors.items()}
            raise AssertionError(f"ledger does not balance: {shown}; {self.summary()}")


def percentile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Ledger:
    """Hands out messages, records what each client was told, checks the sink."""

    def __init__(self, run: str = "") -> None:
        self.run = run or f"r{os.getpid()}x{next(_run_ids)}"
        self.entries: dict[str, Sent] = {}
        self._n = itertools.count()
        self._at_sink: dict[str, list[Seen]] = {}
        self._odd: list[str] = []

    def new(self, size: int = 2048, *, extra_headers: bytes = b"") -> Sent:
        n = next(self._n)
        mid = f"{self.run}.{n}@ledger.test"
        entry = Sent(mid, make_message(mid, size, seed=n, extra_headers=extra_headers))
        self.entries[mid] = entry
        return entry

    def check(self, deliveries: Iterable[bytes], names: Sequence[bytes] = STAMP_FIELDS) -> LedgerReport:
        """The report for these deliveries (everything the sink holds)."""
        at_sink: dict[str, list[Seen]] = {}
        odd: list[str] = []
        for data in deliveries:
            self._observe(at_sink, odd, data, names)
        return self._report(at_sink, odd)

    def observe(self, data: bytes, names: Sequence[bytes] = STAMP_FIELDS) -> None:
        """Streaming form for long runs: note one delivery now, keep only its digest."""
        self._observe(self._at_sink, self._odd, data, names)

    @property
    def observed(self) -> int:
        """How many deliveries `observe` was given."""
        return sum(len(v) for v in self._at_sink.values()) + len(self._odd)

    def report(self) -> LedgerReport:
        """The report over everything `observe` was given."""
        return self._report(self._at_sink, self._odd)

    def _observe(
        self, at_sink: dict[str, list[Seen]], odd: list[str], data: bytes, names: Sequence[bytes]
    ) -> None:
        fields, rest = split_stamp(data, names)
        m = _MID.search(rest)
        mid = m.group(1).decode() if m else ""
        if mid in self.entries:
            seen = Seen(hashlib.sha256(rest).digest(), b"x-triage-category" in fields)
            at_sink.setdefault(mid, []).append(seen)
        else:
            odd.append(mid)

    def _report(self, at_sink: dict[str, list[Seen]], odd: list[str]) -> LedgerReport:
        rep = LedgerReport()
        for mid in odd:
            if mid.startswith(self.run + "."):
                rep.phantom.append(mid)
            else:
                rep.foreign += 1
        for mid, e in self.entries.items():
            rep.sent += 1
            copies = at_sink.get(mid, [])
            rep.delivered += bool(copies)
            rep.replies[str(e.code) if e.code is not None else e.failure or "none"] += 1
            if e.code is None:
                rep.unanswered.append(f"{mid} ({e.failure})")
                continue
            if e.code == 250:
                rep.accepted += 1
                rep.latencies_s.append(e.latency_s)
                if not copies:
                    rep.lost.append(mid)
                    continue
                if len(copies) > 1:
                    rep.duplicated.append(mid)
                if copies[0].digest != e.digest:
                    rep.altered.append(mid)
                if not copies[0].stamped:
                    rep.unstamped.append(mid)
            elif 400 <= e.code < 500:
                rep.tempfailed += 1
                if copies:
                    rep.delivered_after_tempfail.append(mid)
            else:
                rep.rejected += 1
                if copies:
                    rep.delivered_after_reject.append(mid)
        return rep


# --- a raw SMTP client -------------------------------------------------------------------


class NoReply(Exception):
    """The server closed, reset or stayed silent instead of replying."""


class SmtpConn:
    """One client connection; every reply is awaited under `timeout_s`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float) -> None:
        self.reader, self.writer, self.timeout_s = reader, writer, timeout_s

    @classmethod
    async def open(
        cls, host: str, port: int, *, timeout_s: float = 30.0, ehlo: bool = True, local_addr: str | None = None
    ) -> SmtpConn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, limit=1 << 20, local_addr=(local_addr, 0) if local_addr else None
                ),
                timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise NoReply(f"connect: {exc!r}") from None
        conn = cls(reader, writer, timeout_s)
        code, text = await conn.reply()
        if code != 220:
            await conn.close()
            raise Refused(code, text)
        if ehlo:
            code, text = await conn.cmd(b"EHLO ledger.test")
            if code != 250:
                await conn.close()
                raise Refused(code, text)
        return conn

    async def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), self.timeout_s)
            except TimeoutError:
                raise NoReply("timeout") from None
            except asyncio.IncompleteReadError:
                raise NoReply("eof") from None
            except (ConnectionError, asyncio.LimitOverrunError) as exc:
                raise NoReply(type(exc).__name__) from None
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                try:
                    return int(text[:3]), "\n".join(lines)
                except ValueError:
                    raise NoReply(f"garbage reply {text[:40]!r}") from None

    async def cmd(self, line: bytes) -> tuple[int, str]:
        try:
            self.writer.write(line + b"\r\n")
        except (ConnectionError, RuntimeError):
            raise NoReply("reset") from None
        return await self.reply()

    async def data(self, message: bytes) -> tuple[int, str]:
        stuffed = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        try:
            self.writer.write(stuffed + b".\r\n")
        except (ConnectionError, RuntimeError):
            raise NoReply("reset") from None
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, TimeoutError):
            pass


class Refused(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text


async def transact(conn: SmtpConn, entry: Sent, *, rcpts: Sequence[str] = ("rcpt@ledger.test",)) -> bool:
    """One transaction for a ledger entry; records what the client saw.
    True when the connection can carry another transaction."""
    t0 = time.monotonic()
    try:
        steps: list[bytes] = [b"MAIL FROM:<sender@ledger.test>", *(f"RCPT TO:<{r}>".encode() for r in rcpts)]
        for step in steps:
            code, text = await conn.cmd(step)
            if code != 250:
                entry.code, entry.text = code, text
                return code < 500 and code != 421
        code, text = await conn.cmd(b"DATA")
        if code != 354:
            entry.code, entry.text = code, text
            return code != 421
        code, text = await conn.data(entry.raw)
        entry.code, entry.text = code, text
        return code != 421
    except NoReply as exc:
        entry.failure = str(exc)
        return False
    finally:
        entry.latency_s = time.monotonic() - t0


async def send_one(host: str, port: int, entry: Sent, *, timeout_s: float = 30.0) -> None:
    """A fresh connection for one ledger message (a refusal at connect is its reply)."""
    try:
        conn = await SmtpConn.open(host, port, timeout_s=timeout_s)
    except Refused as exc:
        entry.code, entry.text = exc.code, exc.text
        return
    except NoReply as exc:
        entry.failure = str(exc)
        return
    try:
        if await transact(conn, entry):
            await say_quit(conn)
    finally:
        await conn.close()


async def say_quit(conn: SmtpConn) -> None:
    """QUIT as a polite client does; a server already gone is no error here."""
    try:
        await conn.cmd(b"QUIT")
    except NoReply:
        pass


class Load:
    """`clients` connections, each sending ledger messages back to back (reused
    connections, as an MTA does), optionally paced to `rate_per_s` in total."""

    def __init__(
        self,
        host: str,
        port: int,
        ledger: Ledger,
        *,
        clients: int = 4,
        size: int = 2048,
        rate_per_s: float | None = None,
        timeout_s: float = 30.0,
        keep_raw: bool = True,
    ) -> None:
        self.host, self.port, self.ledger = host, port, ledger
        self.clients, self.size, self.rate, self.timeout_s = clients, size, rate_per_s, timeout_s
        self.keep_raw = keep_raw
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def stop(self) -> None:
        """Stop starting transactions; the ones in flight finish."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, i: int) -> None:
        interval = self.clients / self.rate if self.rate else 0.0
        next_at = time.monotonic() + interval * i / max(1, self.clients)
        conn: SmtpConn | None = None
        while not self._stop.is_set():
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                next_at = max(next_at + interval, time.monotonic() - interval)
            if conn is None:
                try:
                    conn = await SmtpConn.open(self.host, self.port, timeout_s=self.timeout_s)
                except (Refused, NoReply):
                    await asyncio.sleep(0.05)  # refused or down: an MTA retries later
                    continue
            entry = self.ledger.new(self.size)
            carry_on = await transact(conn, entry)
            if not self.keep_raw:
                entry.raw = b""
            if not carry_on:
                await conn.close()
                conn = None
            elif entry.code != 250:
                try:  # a clean slate after a failed transaction
                    if (await conn.cmd(b"RSET"))[0] != 250:
                        raise NoReply("rset")
                except NoReply:
                    await conn.close()
                    conn = None
        if conn is not None:
            await say_quit(conn)
            await conn.close()


class Probe:
    """One message every `interval_s` on a fresh connection: what a bystander
    sees during an attack. Its messages are in the ledger like any other."""

    def __init__(self, host: str, port: int, ledger: Ledger, *, interval_s: float = 0.2, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.ledger = host, port, ledger
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.entries: list[Sent] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Probe:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> dict[str, object]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.summary()

    async def _run(self) -> None:
        while not self._stop.is_set():
            entry = self.ledger.new(1024)
            self.entries.append(entry)
            await send_one(self.host, self.port, entry, timeout_s=self.timeout_s)
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            except TimeoutError:
                pass

    def summary(self) -> dict[str, object]:
        lat = [e.latency_s * 1000 for e in self.entries]
        codes = Counter(str(e.code) if e.code is not None else e.failure for e in self.entries)
        return {
            "n": len(self.entries),
            "replies": dict(codes),
            "median_ms": round(statistics.median(lat), 1) if lat else None,
            "p99_ms": round(percentile(lat, 0.99), 1) if lat else None,
            "max_ms": round(max(lat), 1) if lat else None,
        }


# --- memory ---------------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def rss_bytes(pid: int) -> int:
    return _status_kb(pid, "VmRSS") * 1024


class RssSampler:
    """Samples VmRSS of a process and its children every `interval_s` (a thread,
    so a busy event loop does not skew it). Children come and go (an inference
    process restarted after a kill): peaks are per role, "main" and "child"."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.baseline = {"main": rss_bytes(pid), "child": sum(rss_bytes(c) for c in children(pid))}
        self.peak = dict(self.baseline)
        self.peak_total = sum(self.baseline.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(5)
        return self.report()

    def sample(self) -> None:
        main = rss_bytes(self.pid)
        child = max((rss_bytes(c) for c in children(self.pid)), default=0)
        self.peak["main"] = max(self.peak["main"], main)
        self.peak["child"] = max(self.peak["child"], child)
        self.peak_total = max(self.peak_total, main + child)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def report(self) -> dict[str, int]:
        return {
            "baseline_main": self.baseline["main"],
            "baseline_child": self.baseline["child"],
            "peak_main": self.peak["main"],
            "peak_child": self.peak["child"],
            "peak_total": self.peak_total,
            "peak_above_baseline": self.peak_total - sum(self.baseline.values()),
        }
