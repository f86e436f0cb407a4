"""The filter side of one milter connection as a state machine (sans-IO).

Feed it the bytes the MTA sent; take back the commands the filter acts on and
the bytes to write. It negotiates, answers every step the MTA waits on but
the filter has no opinion about (SMFIR_CONTINUE), and keeps replies in
protocol order: after an end-of-message nothing more is processed until the
filter gave its answer (`reply_end_of_message`).

What we ask for at negotiation, and why (Postfix MILTER_README, "Milter
protocol versions"; libmilter smfi_register/xxfi_negotiate):
- actions: ADDHDRS and CHGHDRS (stamp, remove forged copies, tag Subject),
  QUARANTINE (the hold queue), SETSYMLIST (macros per stage, below);
- no CONNECT, HELO, DATA, end-of-header or unknown-command steps: the filter
  uses none of them (the client address comes as a macro);
- MAIL, RCPT, each header and the body *are* used (the transaction record
  and the message the classifier reads), but with the NR_* flags: the MTA
  does not wait for an answer to any of them, so a message costs one round
  trip, at its end;
- HDR_LEADSPC: header values arrive with their leading space, so the header
  block the classifier reads is the one the sender wrote;
- no SKIP: the whole body is read, as in SMTP proxy mode.
Whatever the MTA does not offer is left out, and answered the old way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from proxy.milter import codec as c

WANTED_ACTIONS = c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS | c.SMFIF_QUARANTINE | c.SMFIF_SETSYMLIST
WANTED_PROTOCOL = (
    c.SMFIP_NOCONNECT
    | c.SMFIP_NOHELO
    | c.SMFIP_NODATA
    | c.SMFIP_NOEOH
    | c.SMFIP_NOUNKNOWN
    | c.SMFIP_NR_MAIL
    | c.SMFIP_NR_RCPT
    | c.SMFIP_NR_HDR
    | c.SMFIP_NR_BODY
    | c.SMFIP_HDR_LEADSPC
)
# Macros per stage (Postfix MILTER_README, "Sendmail macro emulation"):
# the client and SASL login are known at MAIL, the queue id at end of message.
WANTED_MACROS = {
    c.STAGE_ENVFROM: "{client_addr} {client_name} {auth_authen}",
    c.STAGE_EOM: "i",
}
VERSION = 6

# Per command type: the NR_* flag that spares its answer (0: it never gets
# one) and whether the filter is shown it. OPTNEG, QUIT and end-of-message
# are handled on their own.
_STEPS: dict[type, tuple[int, bool]] = {
    c.Macros: (0, True),
    c.Abort: (0, True),
    c.Mail: (c.SMFIP_NR_MAIL, True),
    c.Rcpt: (c.SMFIP_NR_RCPT, True),
    c.Header: (c.SMFIP_NR_HDR, True),
    c.Body: (c.SMFIP_NR_BODY, True),
    c.Connect: (c.SMFIP_NR_CONN, False),
    c.Helo: (c.SMFIP_NR_HELO, False),
    c.Data: (c.SMFIP_NR_DATA, False),
    c.EndOfHeaders: (c.SMFIP_NR_EOH, False),
    c.UnknownSmtp: (c.SMFIP_NR_UNKN, False),
}
_CONTINUE = c.CONTINUE.encode()
_ACTION_OF: dict[type, int] = {
    c.AddHeader: c.SMFIF_ADDHDRS,
    c.InsertHeader: c.SMFIF_ADDHDRS,
    c.ChangeHeader: c.SMFIF_CHGHDRS,
    c.Quarantine: c.SMFIF_QUARANTINE,
}

# What the filter is shown; everything else is answered here.
Event = c.Macros | c.Mail | c.Rcpt | c.Header | c.Body | c.EndOfMessage | c.Abort | c.Quit


class MilterProtocol:
    def __init__(self, max_packet: int = c.MAX_PACKET) -> None:
        self._decoder = c.Decoder(max_packet)
        self._queue: deque[c.Command] = deque()
        self._out = bytearray()
        self.negotiated = False
        self.actions = 0  # SMFIF_* agreed
        self.protocol = 0  # SMFIP_* agreed
        self.awaiting_eom_reply = False
        self.closed = False

    @property
    def leading_space(self) -> bool:
        """Header values carry (and our new ones must carry) their leading space."""
        return bool(self.protocol & c.SMFIP_HDR_LEADSPC)

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished packet are buffered (EOF now = truncated)."""
        return self._decoder.pending or bool(self._queue)

    def receive(self, data: bytes) -> list[Event]:
        """Bytes from the MTA; the events to act on now. ProtocolError: close."""
        if data:
            self._queue.extend(self._decoder.feed(data))
        return self._run()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def allows(self, mod: c.Modification) -> bool:
        return bool(self.actions & _ACTION_OF[type(mod)])

    def reply_end_of_message(
        self, modifications: Iterable[c.Modification], reply: c.Reply
    ) -> list[Event]:
        """The filter's answer to the message; then the events that waited for it.

        Modifications the MTA did not agree to are a programming error here:
        check them with `allows` first.
        """
        if not self.awaiting_eom_reply:
            raise RuntimeError("no end of message to answer")
        for mod in modifications:
            if not self.allows(mod):
                raise ValueError(f"{type(mod).__name__} was not negotiated")
            self._out += mod.encode()
        self._out += reply.encode()
        self.awaiting_eom_reply = False
        return self._run()

    def abort_message(self, reply: c.Reply) -> list[Event]:
        """Answer end-of-message without modifications (e.g. a tempfail)."""
        return self.reply_end_of_message((), reply)

    # -- internals --------------------------------------------------------------

    def _run(self) -> list[Event]:
        events = self._process()
        if not events:
            self.raise_error()
        return events

    def raise_error(self) -> None:
        """A bad packet came after the last good command: ProtocolError now,
        once everything before it was handled (and answered)."""
        if not self._queue and not self.awaiting_eom_reply:
            self._decoder.raise_error()

    def _process(self) -> list[Event]:
        events: list[Event] = []
        queue = self._queue
        out = self._out
        while queue and not self.awaiting_eom_reply and not self.closed:
            cmd = queue.popleft()
            step = _STEPS.get(type(cmd))
            if step is not None and self.negotiated:  # the common case, by table
                flag, shown = step
                if flag and not self.protocol & flag:
                    out += _CONTINUE
                if shown:
                    events.append(cmd)  # type: ignore[arg-type]  # the table says it is an Event
                continue
            if isinstance(cmd, c.OptNeg):
                self._negotiate(cmd)
                continue
            if not self.negotiated:
                raise c.ProtocolError(f"{type(cmd).__name__} before negotiation")
            if isinstance(cmd, c.Quit):
                if cmd.new_connection:
                    self.negotiated = False  # a new OPTNEG comes next (SMFIC_QUIT_NC)
                else:
                    self.closed = True
                events.append(cmd)
            elif isinstance(cmd, c.EndOfMessage):
                self.awaiting_eom_reply = True
                events.append(cmd)
        return events

    def _negotiate(self, cmd: c.OptNeg) -> None:
        if self.negotiated:
            raise c.ProtocolError("second negotiation on one connection")
        if cmd.version < 2:
            raise c.ProtocolError(f"milter protocol version {cmd.version} is too old")
        self.actions = WANTED_ACTIONS & cmd.actions
        self.protocol = WANTED_PROTOCOL & cmd.protocol
        macros = WANTED_MACROS if self.actions & c.SMFIF_SETSYMLIST else {}
        self._out += c.optneg_reply(min(cmd.version, VERSION), self.actions, self.protocol, macros)
        self.negotiated = True
