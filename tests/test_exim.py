"""Exim 4 relaying through triaged as an after-queue SMTP content filter.

client -> Exim (port FRONT) -> queue -> router `triaged` (manualroute) ->
triaged (SMTP proxy) -> Exim (port BACK) -> queue -> router `to_sink` ->
the test's capture sink. Mail that came in on BACK skips the `triaged`
router, so nothing goes round twice. With triaged down Exim keeps the mail
deferred in its queue and delivers it once triaged is back.

The router, transport and ACL text is README.md's "Behind Exim" section,
ports substituted; `test_readme_shows_the_tested_exim_lines` keeps the two
identical. Exim is the real Debian exim4-daemon-light 4.96 (.ci/run).
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

import pytest
from exim_instance import EximInstance, exim_missing
from smtp_sink import Delivery, SmtpSink
from triaged_proc import TriagedProcess, free_port, wait_for_banner

pytestmark = pytest.mark.skipif(exim_missing() is not None, reason=str(exim_missing()))

README = Path(__file__).resolve().parent.parent / "README.md"
README_PORTS = {"FRONT_PORT": "25", "TRIAGED_PORT": "10025", "BACK_PORT": "10026"}

# -- README.md, "Behind Exim" ------------------------------------------------------

EXIM_MAIN = """\
daemon_smtp_ports = FRONT_PORT : BACK_PORT
acl_smtp_connect = acl_check_connect
"""

EXIM_ACL = """\
acl_check_connect:
  deny    condition = ${if eq{$received_port}{BACK_PORT}}
          !hosts    = 127.0.0.1
  accept
"""

EXIM_ROUTER = """\
triaged:
  driver = manualroute
  condition = ${if !eq{$received_port}{BACK_PORT}}
  route_list = * 127.0.0.1::TRIAGED_PORT
  transport = triaged_smtp
  self = send
"""

EXIM_TRANSPORT = """\
triaged_smtp:
  driver = smtp
  hosts_avoid_tls = 127.0.0.1
"""

TRIAGED_TOML = """\
[[server.listeners]]
address = "127.0.0.1:10025"

[upstream]
url = "smtp://127.0.0.1:10026"
"""

# -- the rest of the test's Exim configuration (a site has its own) ----------------

EXIM_TEST_MAIN = """\
exim_user = Debian-exim
exim_group = Debian-exim
primary_hostname = exim-test.localdomain
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
local_interfaces = 127.0.0.1
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
keep_environment =
acl_smtp_rcpt = acl_check_rcpt
"""

EXIM_TEST_ACL = """\
acl_check_rcpt:
  accept  hosts = 127.0.0.1
  deny
"""

EXIM_TEST_ROUTERS = """\
to_sink:
  driver = manualroute
  route_list = * 127.0.0.1::SINK_PORT
  transport = plain_smtp
  self = send
"""

EXIM_TEST_TRANSPORTS = """\
plain_smtp:
  driver = smtp
  hosts_avoid_tls = 127.0.0.1
"""


def exim_config(ports: dict[str, str]) -> str:
    text = (
        EXIM_TEST_MAIN + EXIM_MAIN
        + "\nbegin acl\n\n" + EXIM_ACL + "\n" + EXIM_TEST_ACL
        + "\nbegin routers\n\n" + EXIM_ROUTER + "\n" + EXIM_TEST_ROUTERS
        + "\nbegin transports\n\n" + EXIM_TRANSPORT + "\n" + EXIM_TEST_TRANSPORTS
        # Deferred mail is retried every 10 s (the tests also force a run).
        + "\nbegin retry\n\n*  *  F,1h,10s\n"
    )
    for key, value in ports.items():
        text = text.replace(key, value)
    return text


class EximSetup:
    def __init__(self, sink: SmtpSink) -> None:
        self.ports = {"FRONT_PORT": str(free_port()), "TRIAGED_PORT": str(free_port()),
                      "BACK_PORT": str(free_port()), "SINK_PORT": str(sink.port)}
        self.front = int(self.ports["FRONT_PORT"])
        self.exim = EximInstance(exim_config(self.ports))
        self.triaged = TriagedProcess(
            f"smtp://127.0.0.1:{self.ports['BACK_PORT']}", port=int(self.ports["TRIAGED_PORT"])
        )

    def close(self) -> None:
        self.triaged.close()
        self.exim.close()

    def diagnostics(self) -> str:
        return (f"--- exim mainlog\n{self.exim.mainlog()[-4000:]}\n"
                f"--- triaged log\n{self.triaged.log_tail()}")


def _setup(sink: SmtpSink, start_triaged: bool) -> Iterator[EximSetup]:
    setup = EximSetup(sink)
    try:
        if start_triaged:
            setup.triaged.start()
        setup.exim.start()
        wait_for_banner(setup.front)
        yield setup
    except BaseException:
        print(setup.diagnostics())
        raise
    finally:
        setup.close()


@pytest.fixture
def running(sink: SmtpSink) -> Iterator[EximSetup]:
    yield from _setup(sink, start_triaged=True)


@pytest.fixture
def triaged_down(sink: SmtpSink) -> Iterator[EximSetup]:
    yield from _setup(sink, start_triaged=False)


def message(tag: str, i: int) -> bytes:
    return (
        f"From: Alice <alice@example.test>\r\n"
        f"To: bob@example.test\r\n"
        f"Subject: exim {tag} {i}\r\n"
        f"Message-ID: <exim.{tag}.{i}@example.test>\r\n"
        f"X-Triage-Category: forged\r\n"
        f"\r\n"
        f"Body of {tag} {i}.\r\n.leading dot survives\r\n\r\nlast line\r\n"
    ).encode()


def send(port: int, messages: list[bytes]) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=60) as client:
        for msg in messages:
            client.sendmail("alice@example.test", ["bob@example.test"], msg)


def assert_stamped_once(sent: list[bytes], deliveries: list[Delivery]) -> None:
    assert len(deliveries) == len(sent)
    got = {}
    for d in deliveries:
        fields = list(BytesHeaderParser(policy=compat32).parsebytes(d.data).items())
        got[dict((k.lower(), v) for k, v in fields)["message-id"]] = (d, fields)
    for msg in sent:
        mid = msg.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
        d, fields = got[mid]
        categories = [v for k, v in fields if k.lower() == "x-triage-category"]
        assert categories == ["primary"], fields  # ours, once: no forged copy, no second pass
        assert d.data.split(b"\r\n\r\n", 1)[1] == msg.split(b"\r\n\r\n", 1)[1]


@pytest.mark.timeout(120)
def test_exim_relays_through_triaged_and_delivers_stamped_mail(running: EximSetup, sink: SmtpSink) -> None:
    sent = [message("relay", i) for i in range(3)]
    send(running.front, sent)
    sink.wait_for(len(sent), timeout=60)
    running.exim.wait_queue_empty()
    assert_stamped_once(sent, sink.deliveries)
    # Each message went out to triaged once (its 250 is Exim's own, from
    # BACK_PORT, passed through), then once to the sink: no loop.
    log = running.exim.mainlog()
    assert len(re.findall(r"=> bob@example.test R=triaged T=triaged_smtp .*C=\"250 2.0.0 OK id=", log)) == 3, log
    assert len(re.findall(r"=> bob@example.test R=to_sink T=plain_smtp", log)) == 3, log
    assert running.triaged.log_tail(100_000).count('"event":"transaction"') == len(sent)


@pytest.mark.timeout(180)
def test_exim_defers_while_triaged_is_down_then_delivers(triaged_down: EximSetup, sink: SmtpSink) -> None:
    setup = triaged_down
    sent = [message("deferred", i) for i in range(2)]
    send(setup.front, sent)  # Exim queues: 250 for each
    setup.exim.wait_for_log(r"== bob@example.test R=triaged T=triaged_smtp defer \(\d+\)", count=len(sent))
    assert setup.exim.queue_count() == len(sent)
    assert sink.deliveries == []

    setup.triaged.start()
    setup.exim.flush()
    sink.wait_for(len(sent), timeout=60)
    setup.exim.wait_queue_empty()
    assert_stamped_once(sent, sink.deliveries)


def test_readme_shows_the_tested_exim_lines() -> None:
    readme = README.read_text()
    for block in (EXIM_MAIN, EXIM_ACL, EXIM_ROUTER, EXIM_TRANSPORT, TRIAGED_TOML):
        text = block
        for key, value in README_PORTS.items():
            text = text.replace(key, value)
        assert text in readme, f"README.md lacks, verbatim:\n{text}"
