"""triaged behind a real Postfix, both ways the README documents.

Before the queue (Postfix SMTPD_PROXY_README): client -> Postfix smtpd with
`smtpd_proxy_filter` -> triaged -> Postfix reinjection smtpd -> queue ->
relayhost (the test's sink). The client's 250 comes only after triaged and
the reinjection listener accepted, so with triaged down the client gets 4xx.

After the queue (Postfix FILTER_README): client -> Postfix smtpd -> queue ->
`content_filter` transport (an smtp(8) client) -> triaged -> reinjection
smtpd with `-o content_filter=` -> queue -> relayhost. With triaged down the
mail waits in the queue (deferred) and goes out when triaged is back.

The master.cf/main.cf text used here is the text in README.md's Postfix
section, ports substituted; `test_readme_shows_the_tested_postfix_lines`
keeps the two identical.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

import pytest
from postfix_instance import PostfixInstance, postfix_missing
from smtp_sink import Delivery, SmtpSink
from triaged_proc import TriagedProcess, free_port, wait_for_banner

pytestmark = pytest.mark.postfix
needs_postfix = pytest.mark.skipif(postfix_missing() is not None, reason=str(postfix_missing()))

README = Path(__file__).resolve().parent.parent / "README.md"

# -- the set-ups, as README.md shows them (README ports: 25, 10025, 10026) --------

# Before the queue: Postfix SMTPD_PROXY_README, "Configuring the Postfix SMTP
# pass-through proxy feature".
BEFORE_QUEUE_MASTER_CF = """\
{front} inet  n       -       n       -       20      smtpd
    -o smtpd_proxy_filter=127.0.0.1:{triaged}
    -o smtpd_client_connection_count_limit=10
127.0.0.1:{reinject} inet n  -       n       -       -       smtpd
    -o smtpd_authorized_xforward_hosts=127.0.0.0/8
    -o smtpd_client_restrictions=
    -o smtpd_helo_restrictions=
    -o smtpd_sender_restrictions=
    -o smtpd_relay_restrictions=
    -o smtpd_recipient_restrictions=permit_mynetworks,reject
    -o smtpd_data_restrictions=
    -o mynetworks=127.0.0.0/8
    -o receive_override_options=no_unknown_recipient_checks
"""

# After the queue: Postfix FILTER_README, "Advanced content filter".
AFTER_QUEUE_MAIN_CF = """\
content_filter = triaged:[127.0.0.1]:{triaged}
receive_override_options = no_address_mappings
"""

AFTER_QUEUE_MASTER_CF = """\
{front} inet  n       -       n       -       -       smtpd
triaged   unix  -       -       n       -       10      smtp
    -o smtp_send_xforward_command=yes
    -o disable_mime_output_conversion=yes
    -o smtp_generic_maps=
127.0.0.1:{reinject} inet n  -       n       -       10      smtpd
    -o content_filter=
    -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
    -o smtpd_helo_restrictions=
    -o smtpd_client_restrictions=
    -o smtpd_sender_restrictions=
    -o smtpd_relay_restrictions=
    -o smtpd_recipient_restrictions=permit_mynetworks,reject
    -o mynetworks=127.0.0.0/8
    -o smtpd_authorized_xforward_hosts=127.0.0.0/8
"""

CLIENT_HELO = "client-helo.example.test"


def _main_cf(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip())
    return {k.strip(): v.strip() for k, v in pairs}


class Setup:
    """Ports of one set-up; `front` is where a client sends mail."""

    def __init__(self, kind: str, sink: SmtpSink, triaged_toml: str = "") -> None:
        self.kind = kind
        self.front, self.triaged_port, self.reinject = free_port(), free_port(), free_port()
        ports = {"front": f"127.0.0.1:{self.front}", "triaged": self.triaged_port,
                 "reinject": self.reinject}
        master = BEFORE_QUEUE_MASTER_CF if kind == "before" else AFTER_QUEUE_MASTER_CF
        main = _main_cf(AFTER_QUEUE_MAIN_CF.format(**ports)) if kind == "after" else {}
        # Client ports in the maillog tell the real client from triaged's hop.
        main["smtpd_client_port_logging"] = "yes"
        self.postfix = PostfixInstance(sink.port, master_cf=[master.format(**ports)], main_cf=main)
        self.triaged = TriagedProcess(
            f"smtp://127.0.0.1:{self.reinject}", port=self.triaged_port, extra_toml=triaged_toml
        )

    def close(self) -> None:
        self.triaged.close()
        self.postfix.close()

    def diagnostics(self) -> str:
        return (f"--- maillog\n{self.postfix.maillog()[-4000:]}\n"
                f"--- triaged log\n{self.triaged.log_tail()}")


def _setup(
    kind: str, sink: SmtpSink, start_triaged: bool, triaged_toml: str = ""
) -> Iterator[Setup]:
    setup = Setup(kind, sink, triaged_toml)
    try:
        if start_triaged:
            setup.triaged.start()
        setup.postfix.start()
        wait_for_banner(setup.front)
        wait_for_banner(setup.reinject)
        yield setup
    except BaseException:
        print(setup.diagnostics())
        raise
    finally:
        setup.close()


@pytest.fixture(params=["before", "after"])
def running(request: pytest.FixtureRequest, sink: SmtpSink) -> Iterator[Setup]:
    yield from _setup(request.param, sink, start_triaged=True)


@pytest.fixture
def after_queue_down(sink: SmtpSink) -> Iterator[Setup]:
    yield from _setup("after", sink, start_triaged=False)


@pytest.fixture
def before_queue_down(sink: SmtpSink) -> Iterator[Setup]:
    yield from _setup("before", sink, start_triaged=False)


@pytest.fixture
def before_queue_rejecting_forums(sink: SmtpSink) -> Iterator[Setup]:
    policy = '[policy]\ncategory_actions = { forums = "reject" }\n'
    yield from _setup("before", sink, start_triaged=True, triaged_toml=policy)


def _message(tag: str, i: int) -> bytes:
    body = f"Body of {tag} {i}.\r\n.leading dot survives\r\n\r\nlast line\r\n"
    return (
        f"From: Alice <alice@example.test>\r\n"
        f"To: bob@example.test\r\n"
        f"Subject: postfix {tag} {i}\r\n"
        f"Message-ID: <{tag}.{i}@example.test>\r\n"
        f"List-Id: <tests.example.test>\r\n"
        f"X-Triage-Category: forged\r\n"
        f"\r\n{body}"
    ).encode()


def _send(port: int, messages: list[bytes]) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_HELO, timeout=60) as client:
        for msg in messages:
            client.sendmail("alice@example.test", ["bob@example.test"], msg)


def _headers(d: Delivery) -> list[tuple[str, str]]:
    return list(BytesHeaderParser(policy=compat32).parsebytes(d.data).items())


def _body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def _by_message_id(deliveries: list[Delivery]) -> dict[str, Delivery]:
    out: dict[str, Delivery] = {}
    for d in deliveries:
        mid = dict((k.lower(), v) for k, v in _headers(d))["message-id"]
        assert mid not in out, f"{mid} delivered twice"
        out[mid] = d
    return out


def _assert_stamped_and_intact(sent: list[bytes], deliveries: list[Delivery]) -> None:
    got = _by_message_id(deliveries)
    assert len(deliveries) == len(sent)
    for msg in sent:
        mid = re.search(rb"Message-ID: (<[^>]+>)", msg)
        assert mid is not None
        d = got[mid.group(1).decode()]
        categories = [v for k, v in _headers(d) if k.lower() == "x-triage-category"]
        # One stamp, ours: the sender's forged copy is gone.
        assert len(categories) == 1 and categories[0] not in ("", "forged"), categories
        assert _body(d.data) == _body(msg)


# -- tests ------------------------------------------------------------------------


@needs_postfix
@pytest.mark.timeout(120)
def test_postfix_delivers_stamped_mail_through_triaged(running: Setup, sink: SmtpSink) -> None:
    sent = [_message(running.kind, i) for i in range(3)]
    _send(running.front, sent)
    deliveries = sink.wait_for(len(sent), timeout=60)
    running.postfix.wait_queue_empty()
    _assert_stamped_and_intact(sent, sink.deliveries)
    assert len(deliveries) == len(sent)
    # The mail really went through triaged: Postfix logged the hop to it.
    if running.kind == "after":
        running.postfix.wait_for_log(
            rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{running.triaged_port},.*status=sent", count=3
        )


@needs_postfix
@pytest.mark.timeout(120)
def test_postfix_keeps_client_identity_through_triaged(running: Setup, sink: SmtpSink) -> None:
    """XFORWARD end to end (Postfix XFORWARD_README): the reinjection smtpd
    logs the original client (its source port), not triaged's connection."""
    with smtplib.SMTP("127.0.0.1", running.front, local_hostname=CLIENT_HELO) as client:
        assert client.sock is not None
        client_port = client.sock.getsockname()[1]
        client.sendmail("alice@example.test", ["bob@example.test"], _message("xforward", 0))
    (delivery,) = sink.wait_for(1, timeout=60)
    # Received lines are prepended: the first is the reinjection smtpd's.
    received = [v for k, v in _headers(delivery) if k.lower() == "received"]
    queue_id = re.search(r"with E?SMTP id (\w+)", received[0])
    assert queue_id is not None, received[0]
    (line,) = running.postfix.wait_for_log(rf"{queue_id.group(1)}: client=")
    assert f"orig_client=unknown[127.0.0.1]:{client_port}" in line, line


@needs_postfix
@pytest.mark.timeout(180)
def test_after_queue_defers_while_triaged_is_down_and_loses_nothing(
    after_queue_down: Setup, sink: SmtpSink
) -> None:
    setup = after_queue_down
    pf = setup.postfix
    sent = [_message("deferred", i) for i in range(5)]
    _send(setup.front, sent)  # Postfix queues: 250 for every message

    deferred = pf.wait_for_log(
        rf"relay=none.*127\.0\.0\.1\[127\.0\.0\.1\]:{setup.triaged_port}.*status=deferred"
        rf"|status=deferred.*127\.0\.0\.1\[127\.0\.0\.1\]:{setup.triaged_port}",
        count=len(sent),
    )
    assert len({line.split(": ")[1] for line in deferred}) == len(sent)  # one per queue id
    assert len(pf.queue()) == len(sent)
    assert all(m["queue_name"] == "deferred" for m in pf.queue())
    assert sink.deliveries == []

    setup.triaged.start()
    pf.flush()
    sink.wait_for(len(sent), timeout=60)
    pf.wait_queue_empty(timeout=60)
    # Queue empty: no delivery can still be under way, so the count is final.
    _assert_stamped_and_intact(sent, sink.deliveries)


@needs_postfix
@pytest.mark.timeout(180)
def test_before_queue_tempfails_while_triaged_is_down_then_delivers(
    before_queue_down: Setup, sink: SmtpSink
) -> None:
    setup = before_queue_down
    msg = _message("tempfail", 0)
    with pytest.raises((smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused)) as info:
        _send(setup.front, [msg])
    exc = info.value
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
    else:
        assert isinstance(exc, smtplib.SMTPResponseException)
        codes = [exc.smtp_code]
    assert all(400 <= c < 500 for c in codes), codes  # the client keeps the mail and retries
    assert setup.postfix.queue() == []
    assert sink.deliveries == []

    # triaged is back; the client retries, as an MTA does after a 4xx.
    setup.triaged.start()
    sent = [msg, _message("tempfail", 1)]
    _send(setup.front, sent)
    sink.wait_for(len(sent), timeout=60)
    setup.postfix.wait_queue_empty(timeout=60)
    _assert_stamped_and_intact(sent, sink.deliveries)


@needs_postfix
@pytest.mark.timeout(120)
def test_before_queue_passes_triaged_reject_to_the_sending_client(
    before_queue_rejecting_forums: Setup, sink: SmtpSink
) -> None:
    """Before the queue, triaged's verdict is the sender's answer: a policy
    reject is a 5xx to the client and nothing is queued or delivered."""
    setup = before_queue_rejecting_forums
    with pytest.raises(smtplib.SMTPDataError) as info:
        _send(setup.front, [_message("rejected", 0)])  # List-Id: a forums message
    assert info.value.smtp_code == 550, info.value
    text = info.value.smtp_error
    assert (text.decode() if isinstance(text, bytes) else text).startswith("5.7.1"), info.value

    personal = _message("accepted", 0).replace(b"List-Id: <tests.example.test>\r\n", b"")
    _send(setup.front, [personal])
    sink.wait_for(1, timeout=60)
    setup.postfix.wait_queue_empty()
    _assert_stamped_and_intact([personal], sink.deliveries)


def test_readme_shows_the_tested_postfix_lines() -> None:
    """README's Postfix section carries these exact lines (README ports)."""
    readme = README.read_text()
    ports = {"front": "smtp     ", "triaged": 10025, "reinject": 10026}
    for block in (BEFORE_QUEUE_MASTER_CF, AFTER_QUEUE_MAIN_CF, AFTER_QUEUE_MASTER_CF):
        text = block.format(**ports)
        assert text in readme, f"README.md lacks, verbatim:\n{text}"
