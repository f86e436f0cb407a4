"""triaged as a milter behind a real Postfix 3.7 (Postfix MILTER_README).

client -> Postfix smtpd (smtpd_milters = triaged) -> queue -> relayhost (the
test's capture sink). Mail submitted with sendmail(1) goes through
non_smtpd_milters. The main.cf lines are README.md's "Postfix milter"
section, ports substituted; `test_readme_shows_the_tested_milter_lines`
keeps the two identical. triaged runs as `triaged serve` (uvloop), and for
the tests that take `running`, also in this process on the stdlib loop
(the same TOML file, decoded the same way), so both loops meet real Postfix.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

import dkim
import pytest
from postfix_instance import PostfixInstance, postfix_missing
from smtp_sink import Delivery, SmtpSink
from test_dkim import DOMAIN, SELECTOR, Key
from triaged_proc import TriagedProcess, free_port, wait_for_banner

from proxy.settings import load_settings
from proxy.transaction import TransactionRecord

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(postfix_missing() is not None, reason=str(postfix_missing())),
]

README = Path(__file__).resolve().parent.parent / "README.md"
SENDMAIL = "/usr/sbin/sendmail"

# README.md, "Postfix: triaged as a milter" (README address: inet:127.0.0.1:8891).
MILTER_MAIN_CF = """\
smtpd_milters = {milter}
non_smtpd_milters = $smtpd_milters
milter_protocol = 6
milter_default_action = tempfail
milter_connect_timeout = 10s
milter_command_timeout = 10s
milter_content_timeout = 60s
"""

# README.md, the triaged side of it.
MILTER_TRIAGED_TOML = """\
[[server.listeners]]
address = "{milter}"
protocol = "milter"
"""


def _main_cf(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip())
    return {k.strip(): v.strip() for k, v in pairs}


class InProcessTriaged:
    """TriagedProcess's config, served by `proxy.server.Server` on a stdlib
    event loop in a thread of this process (serve_forever always uses uvloop)."""

    def __init__(self, config: TriagedProcess) -> None:
        self.config = config
        self.records: list[TransactionRecord] = []
        self.proc = None  # no process to signal
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def record(self, record: TransactionRecord) -> None:
        self.records.append(record)

    def start(self) -> InProcessTriaged:
        from proxy.server import Server

        settings = load_settings(self.config.config_path)
        ready = threading.Event()
        failed: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            srv = Server(settings, sinks=[self])
            try:
                await srv.start()
            except BaseException as exc:
                failed.append(exc)
                ready.set()
                return
            ready.set()
            await self._stop.wait()
            await srv.stop(drain_timeout_s=2.0)

        def thread() -> None:
            with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
                runner.run(main())

        self._thread = threading.Thread(target=thread, daemon=True)
        self._thread.start()
        ready.wait(30)
        if failed:
            raise failed[0]
        return self

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)

    def transactions(self) -> int:
        return len(self.records)

    def log_tail(self, limit: int = 4000) -> str:
        return "\n".join(repr(r) for r in self.records)[-limit:]


class MilterSetup:
    def __init__(self, sink: SmtpSink, *, unix: bool = False, policy: str = "",
                 main_cf: dict[str, str] | None = None, loop: str = "uvloop") -> None:
        self.front = free_port()
        if unix:
            # Postfix's smtpd runs as `postfix`: a directory it can traverse,
            # a socket it owns (mode 0660, the default).
            self.sock_dir = Path(tempfile.mkdtemp(prefix="triaged-milter-"))
            self.sock_dir.chmod(0o755)
            self.milter = f"unix:{self.sock_dir / 'milter.sock'}"
            toml = MILTER_TRIAGED_TOML.format(milter=self.milter) + 'socket_owner = "postfix:postfix"\n'
        else:
            self.milter = f"inet:127.0.0.1:{free_port()}"
            toml = MILTER_TRIAGED_TOML.format(milter=self.milter)
        main = _main_cf(MILTER_MAIN_CF.format(milter=self.milter))
        main.update(main_cf or {})
        self.postfix = PostfixInstance(
            sink.port, master_cf=[f"127.0.0.1:{self.front} inet n - n - - smtpd"], main_cf=main
        )
        # The SMTP listener TriagedProcess always has only serves as its
        # readiness check here; mail reaches triaged through the milter.
        self.process = TriagedProcess(f"smtp://127.0.0.1:{sink.port}", extra_toml=policy + toml)
        self.triaged: TriagedProcess | InProcessTriaged = (
            self.process if loop == "uvloop" else InProcessTriaged(self.process)
        )

    def transactions(self) -> int:
        """Transactions triaged logged (one canonical line each)."""
        if isinstance(self.triaged, InProcessTriaged):
            return self.triaged.transactions()
        return self.triaged.log_tail(1_000_000).count('"event":"transaction"')

    def close(self) -> None:
        if self.process.proc is not None:
            os.kill(self.process.proc.pid, signal.SIGCONT)  # in case a test left it stopped
        self.triaged.close()
        self.process.close()
        self.postfix.close()

    def diagnostics(self) -> str:
        return (f"--- maillog\n{self.postfix.maillog()[-4000:]}\n"
                f"--- triaged log\n{self.triaged.log_tail()}")


def _setup(sink: SmtpSink, start_triaged: bool = True, **kw: object) -> Iterator[MilterSetup]:
    setup = MilterSetup(sink, **kw)  # type: ignore[arg-type]
    try:
        if start_triaged:
            setup.triaged.start()
        setup.postfix.start()
        wait_for_banner(setup.front)
        yield setup
    except BaseException:
        print(setup.diagnostics())
        raise
    finally:
        setup.close()


@pytest.fixture(params=["inet-uvloop", "unix-uvloop", "inet-asyncio"])
def running(request: pytest.FixtureRequest, sink: SmtpSink) -> Iterator[MilterSetup]:
    transport, loop = request.param.split("-")
    yield from _setup(sink, unix=transport == "unix", loop=loop)


POLICY = '[policy]\ncategory_actions = { forums = "reject", promotions = "quarantine" }\n'


@pytest.fixture
def with_policy(sink: SmtpSink) -> Iterator[MilterSetup]:
    yield from _setup(sink, policy=POLICY)


@pytest.fixture
def stopped(sink: SmtpSink) -> Iterator[MilterSetup]:
    yield from _setup(sink, start_triaged=False)


@pytest.fixture
def short_timeouts(sink: SmtpSink) -> Iterator[MilterSetup]:
    yield from _setup(sink, main_cf={"milter_connect_timeout": "3s", "milter_command_timeout": "3s"})


def message(tag: str, i: int, extra: str = "") -> bytes:
    body = f"Body of {tag} {i}.\r\n.leading dot survives\r\n\r\n  trailing spaces  \r\nlast line\r\n"
    return (
        f"From: Alice <alice@example.test>\r\n"
        f"To: bob@example.test\r\n"
        f"Subject: milter {tag} {i}\r\n"
        f"Message-ID: <{tag}.{i}@example.test>\r\n"
        f"{extra}"
        f"x-triage-CATEGORY: forged\r\n"
        f"X-Triage-Score: 0.999\r\n\tfolded forgery\r\n"
        f"X-Triage-Spam : yes\r\n"
        f"\r\n{body}"
    ).encode()


def send(port: int, messages: list[bytes]) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=60) as client:
        for msg in messages:
            client.sendmail("alice@example.test", ["bob@example.test"], msg)


def headers(d: Delivery) -> list[tuple[str, str]]:
    return list(BytesHeaderParser(policy=compat32).parsebytes(d.data).items())


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def assert_stamped(sent: bytes, d: Delivery) -> None:
    fields = headers(d)
    names = [k.lower() for k, _ in fields]
    ours = [v for k, v in fields if k.lower().startswith("x-triage-")]
    # Ours, once each, no forged copy left (any case, folded, "name :").
    assert names.count("x-triage-category") == 1, fields
    assert "forged" not in ours and not any("folded forgery" in v for v in ours), fields
    assert "x-triage-spam" not in names, fields
    # At the top: above every field the sender wrote and Postfix's Received.
    first_theirs = min(names.index(n) for n in ("from", "received"))
    assert max(i for i, n in enumerate(names) if n.startswith("x-triage-")) < first_theirs, names
    assert body_of(d.data) == body_of(sent)


def by_message_id(deliveries: list[Delivery]) -> dict[str, Delivery]:
    out: dict[str, Delivery] = {}
    for d in deliveries:
        mid = dict((k.lower(), v) for k, v in headers(d))["message-id"]
        assert mid not in out, f"{mid} delivered twice"
        out[mid] = d
    return out


# -- tests -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_postfix_milter_stamps_and_removes_forged_copies(running: MilterSetup, sink: SmtpSink) -> None:
    sent = [message("stamp", i) for i in range(3)]
    send(running.front, sent)
    sink.wait_for(len(sent), timeout=60)
    running.postfix.wait_queue_empty()
    got = by_message_id(sink.deliveries)
    assert len(sink.deliveries) == len(sent)
    for i, msg in enumerate(sent):
        d = got[f"<stamp.{i}@example.test>"]
        assert_stamped(msg, d)
        assert dict(headers(d))["X-Triage-Category"] == "primary"
    # triaged logged one transaction per message, from its milter front end.
    assert running.transactions() == len(sent)


@pytest.mark.timeout(120)
def test_dkim_signature_verifies_after_the_milter(
    running: MilterSetup, sink: SmtpSink, tmp_path: Path
) -> None:
    key = Key(tmp_path)
    # dkimpy cannot parse "name :" fields; the folded forged copy stays.
    msg = message("dkim", 0).replace(b"X-Triage-Spam : yes\r\n", b"")
    signed = dkim.sign(msg, SELECTOR, DOMAIN, key.private_pem, canonicalize=(b"relaxed", b"simple")) + msg
    assert dkim.verify(signed, dnsfunc=key.dns)
    send(running.front, [signed])
    (d,) = sink.wait_for(1, timeout=60)
    assert b"\r\nX-Triage-Category: " in b"\r\n" + d.data
    assert dkim.verify(d.data, dnsfunc=key.dns), "DKIM broke in transit"
    tampered = d.data.replace(b"leading dot survives", b"leading dot survivez")
    assert not dkim.verify(tampered, dnsfunc=key.dns)


@pytest.mark.timeout(120)
def test_reject_is_550_at_the_client_and_quarantine_goes_to_hold(with_policy: MilterSetup, sink: SmtpSink) -> None:
    setup = with_policy
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(setup.front, [message("rejected", 0, "List-Id: <tests.example.test>\r\n")])
    assert info.value.smtp_code == 550
    text = info.value.smtp_error
    assert (text.decode() if isinstance(text, bytes) else text).startswith("5.7.1"), info.value

    send(setup.front, [message("held", 0, "List-Unsubscribe: <mailto:leave@example.test>\r\n")])
    # Postfix 3.7 logs "milter triggers HOLD action", not the reason we sent.
    setup.postfix.wait_for_log(r"milter-hold: END-OF-MESSAGE from ")
    assert '"verdict":"quarantine"' in setup.triaged.log_tail(100_000)
    (held,) = setup.postfix.queue()
    assert held["queue_name"] == "hold"

    send(setup.front, [message("accepted", 0)])
    (d,) = sink.wait_for(1, timeout=60)
    assert_stamped(message("accepted", 0), d)
    # The delivered one leaves the active queue a moment after the sink's 250;
    # the held one stays.
    deadline = time.monotonic() + 30
    while [q["queue_name"] for q in setup.postfix.queue()] != ["hold"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [q["queue_name"] for q in setup.postfix.queue()] == ["hold"]


@pytest.mark.timeout(120)
def test_non_smtpd_milters_stamp_mail_from_sendmail(running: MilterSetup, sink: SmtpSink) -> None:
    msg = message("sendmail", 0)
    subprocess.run(
        [SENDMAIL, "-C", str(running.postfix.config_dir), "-f", "alice@example.test", "bob@example.test"],
        input=msg.replace(b"\r\n", b"\n"), check=True, timeout=30,
    )
    (d,) = sink.wait_for(1, timeout=60)
    assert_stamped(msg, d)
    running.postfix.wait_for_log(r"postfix/pickup.*uid=0")


def _expect_tempfail(port: int, msg: bytes) -> None:
    with pytest.raises(smtplib.SMTPException) as info:
        send(port, [msg])
    exc = info.value
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
    else:
        assert isinstance(exc, smtplib.SMTPResponseException), exc
        codes = [exc.smtp_code]
    assert all(400 <= c < 500 for c in codes), codes


@pytest.mark.timeout(180)
def test_triaged_stopped_tempfails_then_the_retry_arrives(stopped: MilterSetup, sink: SmtpSink) -> None:
    setup = stopped
    msg = message("retry", 0)
    _expect_tempfail(setup.front, msg)
    assert setup.postfix.queue() == [] and sink.deliveries == []
    setup.triaged.start()
    send(setup.front, [msg])  # the client retries, as an MTA does after 4xx
    (d,) = sink.wait_for(1, timeout=60)
    assert_stamped(msg, d)
    setup.postfix.wait_queue_empty()
    assert len(sink.deliveries) == 1


@pytest.mark.timeout(180)
def test_triaged_hung_tempfails_then_the_retry_arrives(short_timeouts: MilterSetup, sink: SmtpSink) -> None:
    setup = short_timeouts
    proc = setup.process.proc
    assert proc is not None
    # Hung: the kernel still accepts its connections. Every process of it
    # (the supervisor and its workers, or the one process and its inference child).
    hung = [proc.pid, *setup.process.children()]
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        msg = message("hung", 0)
        _expect_tempfail(setup.front, msg)
        assert setup.postfix.queue() == [] and sink.deliveries == []
        setup.postfix.wait_for_log(r"milter inet:127\.0\.0\.1:\d+: .*timed out")
    finally:
        for pid in hung:
            os.kill(pid, signal.SIGCONT)
    send(setup.front, [msg])
    (d,) = sink.wait_for(1, timeout=60)
    assert_stamped(msg, d)
    setup.postfix.wait_queue_empty()
    assert len(sink.deliveries) == 1


def test_readme_shows_the_tested_milter_lines() -> None:
    readme = README.read_text()
    for block in (MILTER_MAIN_CF, MILTER_TRIAGED_TOML):
        text = block.format(milter="inet:127.0.0.1:8891")
        assert text in readme, f"README.md lacks, verbatim:\n{text}"


@pytest.fixture
def stopped_accepting(sink: SmtpSink) -> Iterator[MilterSetup]:
    yield from _setup(sink, start_triaged=False, main_cf={"milter_default_action": "accept"})


@pytest.mark.timeout(120)
def test_default_action_accept_lets_mail_through_unstamped(stopped_accepting: MilterSetup, sink: SmtpSink) -> None:
    """The other choice README describes: mail flows on, without categories."""
    msg = message("accept", 0)
    send(stopped_accepting.front, [msg])
    (d,) = sink.wait_for(1, timeout=60)
    ours = [v for k, v in headers(d) if k.lower() == "x-triage-category"]
    assert ours == ["forged"]  # nothing filtered it: not even the forged copy went
    assert body_of(d.data) == body_of(msg)
