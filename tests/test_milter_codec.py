"""The milter codec and state machine, fed byte vectors (no sockets).

Vectors follow the wire format in draft-adams-milter-protocol and libmilter's
mfdef.h: uint32 length (command byte included), command byte, data.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.milter import codec as c
from proxy.milter.protocol import WANTED_ACTIONS, WANTED_PROTOCOL, MilterProtocol

POSTFIX_ACTIONS = 0x1FF  # Postfix 3.7 offers every action
POSTFIX_PROTOCOL = 0x1FFFFF  # and every protocol step flag up to HDR_LEADSPC


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


OPTNEG = pkt(b"O", struct.pack("!III", 6, POSTFIX_ACTIONS, POSTFIX_PROTOCOL))
MACRO_MAIL = pkt(b"D", b"M{client_addr}\x00192.0.2.7\x00{auth_authen}\x00alice\x00")
MAIL = pkt(b"M", b"<alice@example.test>\x00SIZE=123\x00")
RCPT = pkt(b"R", b"<bob@example.test>\x00")
HEADER = pkt(b"L", b"Subject\x00 hello\x00")
BODY = pkt(b"B", b"line one\r\n")
MACRO_EOM = pkt(b"D", b"Ei\x00ABC123\x00")
EOM = pkt(b"E")
MESSAGE = MACRO_MAIL + MAIL + RCPT + HEADER + BODY + MACRO_EOM + EOM

# -- decoder: every command Postfix sends --------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (OPTNEG, c.OptNeg(6, POSTFIX_ACTIONS, POSTFIX_PROTOCOL)),
        (MACRO_MAIL, c.Macros(ord("M"), {"{client_addr}": "192.0.2.7", "{auth_authen}": "alice"})),
        (pkt(b"D", b"C"), c.Macros(ord("C"), {})),
        (pkt(b"C", b"mx.example.test\x004\x00\x19192.0.2.7\x00"),
         c.Connect("mx.example.test", "4", 25, "192.0.2.7")),
        (pkt(b"C", b"localhost\x00U"), c.Connect("localhost", "U", 0, "")),
        (pkt(b"H", b"client.example.test\x00"), c.Helo("client.example.test")),
        (MAIL, c.Mail(("<alice@example.test>", "SIZE=123"))),
        (RCPT, c.Rcpt(("<bob@example.test>",))),
        (pkt(b"T"), c.Data()),
        (HEADER, c.Header(b"Subject", b" hello")),
        (pkt(b"L", b"X-Folded\x00 a\n\tb\x00"), c.Header(b"X-Folded", b" a\n\tb")),
        (pkt(b"L", b"X-Empty\x00\x00"), c.Header(b"X-Empty", b"")),
        (pkt(b"N"), c.EndOfHeaders()),
        (BODY, c.Body(b"line one\r\n")),
        (pkt(b"B"), c.Body(b"")),
        (EOM, c.EndOfMessage()),
        (pkt(b"A"), c.Abort()),
        (pkt(b"Q"), c.Quit()),
        (pkt(b"K"), c.Quit(new_connection=True)),
        (pkt(b"U", b"VRFY root\x00"), c.UnknownSmtp(b"VRFY root")),
    ],
)
def test_decodes_each_command(raw: bytes, expected: c.Command) -> None:
    assert c.Decoder().feed(raw) == [expected]


def test_split_packets_byte_by_byte() -> None:
    d = c.Decoder()
    out: list[c.Command] = []
    for i in range(len(MESSAGE)):
        got = d.feed(MESSAGE[i : i + 1])
        out += got
        assert d.pending == (not got)  # mid-packet until a packet completes
    assert [type(x) for x in out] == [c.Macros, c.Mail, c.Rcpt, c.Header, c.Body, c.Macros, c.EndOfMessage]


def test_coalesced_packets_in_one_read() -> None:
    out = c.Decoder().feed(OPTNEG + MESSAGE + MESSAGE)
    assert len(out) == 15 and isinstance(out[0], c.OptNeg)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (struct.pack("!I", c.MAX_PACKET + 1) + b"B", "out of range"),
        (struct.pack("!I", 0xFFFFFFFF), "out of range"),  # detected from the length alone
        (struct.pack("!I", 0), "out of range"),
        (pkt(b"Z", b"whatever"), "unknown command"),
        (pkt(b"L", b"Subject\x00no terminator"), "not NUL-terminated"),
        (pkt(b"L", b"OnlyName\x00"), "expected name and value"),
        (pkt(b"O", b"\x00\x00\x00\x06"), "optneg: truncated"),
        (pkt(b"C", b"host\x00" + b"4\x00"), "truncated"),
        (pkt(b"C", b"host\x00X\x00\x19addr\x00"), "bad address family"),
        (pkt(b"D", b"Mname-without-value\x00"), "name without value"),
        (pkt(b"T", b"junk"), "unexpected data"),
    ],
)
def test_malformed_input_is_a_protocol_error(raw: bytes, why: str) -> None:
    with pytest.raises(c.ProtocolError, match=why):
        c.Decoder().feed(raw)


def test_truncated_packet_stays_pending() -> None:
    d = c.Decoder()
    assert d.feed(HEADER[:-3]) == []
    assert d.pending  # the listener logs EOF now as a truncated packet
    assert d.feed(HEADER[-3:]) == [c.Header(b"Subject", b" hello")]
    assert not d.pending


# -- encoder: every reply and modification we send -------------------------------


@pytest.mark.parametrize(
    ("reply", "raw"),
    [
        (c.CONTINUE, b"\x00\x00\x00\x01c"),
        (c.ACCEPT, b"\x00\x00\x00\x01a"),
        (c.TEMPFAIL, b"\x00\x00\x00\x01t"),
        (c.ReplyCode("550 5.7.1 Message rejected by policy"),
         pkt(b"y", b"550 5.7.1 Message rejected by policy\x00")),
        (c.AddHeader("Subject", " [SPAM]"), pkt(b"h", b"Subject\x00 [SPAM]\x00")),
        (c.InsertHeader(0, "X-Triage-Category", " primary"),
         pkt(b"i", b"\x00\x00\x00\x00X-Triage-Category\x00 primary\x00")),
        (c.ChangeHeader(2, b"x-triage-score ", b""), pkt(b"m", b"\x00\x00\x00\x02x-triage-score \x00\x00")),
        (c.Quarantine("triaged: category promotions"), pkt(b"q", b"triaged: category promotions\x00")),
    ],
)
def test_encodes_each_reply(reply: c.Reply | c.Modification, raw: bytes) -> None:
    assert reply.encode() == raw


def test_optneg_reply_with_macros_per_stage() -> None:
    raw = c.optneg_reply(6, 0x131, 0x1, {5: "i", 2: "{client_addr}"})
    assert raw == pkt(
        b"O",
        struct.pack("!III", 6, 0x131, 1)
        + struct.pack("!I", 2) + b"{client_addr}\x00"
        + struct.pack("!I", 5) + b"i\x00",
    )


def test_nul_in_a_string_is_refused() -> None:
    with pytest.raises(ValueError):
        c.ReplyCode("550 a\x00b").encode()


# -- the state machine -------------------------------------------------------------


def negotiated(actions: int = POSTFIX_ACTIONS, protocol: int = POSTFIX_PROTOCOL) -> MilterProtocol:
    p = MilterProtocol()
    assert p.receive(pkt(b"O", struct.pack("!III", 6, actions, protocol))) == []
    return p


def test_negotiation_asks_only_for_what_is_used() -> None:
    p = negotiated()
    reply = p.data_to_send()
    assert reply[4:5] == b"O"
    version, actions, protocol = struct.unpack_from("!III", reply, 5)
    assert version == 6
    assert actions == WANTED_ACTIONS == 0x01 | 0x10 | 0x20 | 0x100
    assert protocol == WANTED_PROTOCOL
    # No connect/helo/data/EOH/unknown steps; no answers awaited for MAIL,
    # RCPT, headers and body; values with their leading space; no SKIP.
    assert protocol & (0x01 | 0x02 | 0x200 | 0x40 | 0x100) == 0x01 | 0x02 | 0x200 | 0x40 | 0x100
    assert protocol & (0x4000 | 0x8000 | 0x80 | 0x80000 | 0x100000) == 0x4000 | 0x8000 | 0x80 | 0x80000 | 0x100000
    assert protocol & (0x10 | 0x20 | 0x04 | 0x08 | 0x400) == 0  # body, headers, MAIL, RCPT wanted
    macros = reply[17:]
    assert macros == (struct.pack("!I", 2) + b"{client_addr} {client_name} {auth_authen}\x00"
                      + struct.pack("!I", 5) + b"i\x00")


def test_negotiation_takes_only_what_the_mta_offers() -> None:
    p = negotiated(actions=0x01 | 0x10, protocol=0x3F)  # an old MTA: no NR, no SETSYMLIST
    reply = p.data_to_send()
    _, actions, protocol = struct.unpack_from("!III", reply, 5)
    assert actions == 0x11 and protocol == WANTED_PROTOCOL & 0x3F
    assert len(reply) == 17  # no macro lists without SETSYMLIST
    # Without NR flags every step is answered with continue, in order.
    events = p.receive(MAIL + RCPT + HEADER + BODY)
    assert [type(e) for e in events] == [c.Mail, c.Rcpt, c.Header, c.Body]
    assert p.data_to_send() == b"\x00\x00\x00\x01c" * 4
    assert not p.allows(c.Quarantine("x"))


def test_no_reply_steps_cost_no_bytes_and_eom_waits_for_the_filter() -> None:
    p = negotiated()
    p.data_to_send()
    events = p.receive(MESSAGE + MESSAGE)  # a second message already in the pipe
    assert isinstance(events[-1], c.EndOfMessage) and len(events) == 7
    assert p.data_to_send() == b""
    assert p.awaiting_eom_reply
    more = p.reply_end_of_message([c.InsertHeader(0, "X-Triage-Category", " primary")], c.CONTINUE)
    assert p.data_to_send() == (
        pkt(b"i", b"\x00\x00\x00\x00X-Triage-Category\x00 primary\x00") + b"\x00\x00\x00\x01c"
    )
    assert len(more) == 7  # the second message, released only after the answer
    p.reply_end_of_message([], c.ReplyCode("451 4.7.1 later"))
    assert p.data_to_send() == pkt(b"y", b"451 4.7.1 later\x00")


def test_unnegotiated_modification_is_refused() -> None:
    p = negotiated(actions=0x01 | 0x10)
    p.receive(EOM)
    with pytest.raises(ValueError):
        p.reply_end_of_message([c.Quarantine("no")], c.CONTINUE)


def test_commands_before_negotiation_are_a_protocol_error() -> None:
    with pytest.raises(c.ProtocolError, match="before negotiation"):
        MilterProtocol().receive(MAIL)


def test_second_negotiation_is_a_protocol_error_but_quit_nc_allows_it() -> None:
    p = negotiated()
    with pytest.raises(c.ProtocolError, match="second negotiation"):
        p.receive(OPTNEG)
    p = negotiated()
    events = p.receive(pkt(b"K") + OPTNEG + MAIL)
    assert [type(e) for e in events] == [c.Quit, c.Mail]
    assert not p.closed


def test_quit_closes_and_abort_is_an_event() -> None:
    p = negotiated()
    assert [type(e) for e in p.receive(MAIL + pkt(b"A") + pkt(b"Q") + MAIL)] == [c.Mail, c.Abort, c.Quit]
    assert p.closed


def test_steps_we_did_not_ask_for_are_still_answered() -> None:
    """An MTA that sends CONNECT/HELO/DATA/EOH anyway (not NR) gets continue."""
    p = negotiated()
    p.data_to_send()
    events = p.receive(pkt(b"C", b"h\x00U") + pkt(b"H", b"x\x00") + pkt(b"T") + pkt(b"N"))
    assert events == []
    assert p.data_to_send() == b"\x00\x00\x00\x01c" * 4


# -- fuzz: the decoder never raises anything but ProtocolError, never loops ------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_fuzz_decoder_only_raises_protocol_error(data: bytes, step: int) -> None:
    d = c.Decoder(max_packet=4096)
    try:
        for i in range(0, len(data), step):
            d.feed(data[i : i + step])
    except c.ProtocolError:
        pass


_cmd = st.sampled_from(b"ABCDEHKLMNOQRTU")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_cmd, st.binary(max_size=40)), max_size=12))
def test_fuzz_well_framed_packets_of_known_commands(packets: list[tuple[int, bytes]]) -> None:
    """Right framing, arbitrary data: commands or ProtocolError, through the state machine too."""
    raw = b"".join(pkt(bytes([cmd]), data) for cmd, data in packets)
    p = MilterProtocol()
    try:
        p.receive(OPTNEG + raw)
        while p.awaiting_eom_reply:
            p.reply_end_of_message([], c.CONTINUE)
    except c.ProtocolError:
        pass


def test_commands_before_a_bad_packet_are_handled_then_the_error_comes() -> None:
    p = negotiated()
    events = p.receive(MAIL + HEADER + EOM + pkt(b"Z", b"junk"))
    assert [type(e) for e in events] == [c.Mail, c.Header, c.EndOfMessage]
    with pytest.raises(c.ProtocolError, match="unknown command"):
        p.reply_end_of_message([], c.CONTINUE)
    assert p.data_to_send().endswith(b"\x00\x00\x00\x01c")  # the answer is still there to send
    with pytest.raises(c.ProtocolError):
        p.receive(MAIL)  # and the connection stays failed


def test_a_bad_packet_after_non_final_commands_is_raised_after_them() -> None:
    p = negotiated()
    events = p.receive(MAIL + pkt(b"Z"))
    assert [type(e) for e in events] == [c.Mail]
    with pytest.raises(c.ProtocolError):
        p.raise_error()
