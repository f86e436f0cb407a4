"""The ledger itself: it must catch each way mail can go wrong, or the hostile
suite and the soak prove nothing."""

from __future__ import annotations

from ledger import Ledger, make_message, split_stamp

STAMP = b"X-Triage-Category: primary\r\nX-Triage-Score: 0.9\r\nX-Triage-Model: m/1\r\n"


def test_split_stamp_peels_only_our_fields_off_the_top() -> None:
    raw = b"From: a@b\r\nX-Triage-Category: spoofed\r\n\r\nbody\r\n"
    fields, rest = split_stamp(STAMP + raw)
    assert rest == raw and fields[b"x-triage-category"] == b"primary"
    fields, rest = split_stamp(b"X-Triage-Score: 0.5\r\n\tfolded\r\n" + raw)
    assert rest == raw and b"x-triage-score" in fields


def test_a_balanced_ledger() -> None:
    ledger = Ledger()
    ok, temp, rej = ledger.new(), ledger.new(), ledger.new()
    ok.code, temp.code, rej.code = 250, 451, 550
    report = ledger.check([STAMP + ok.raw, STAMP + temp.raw])
    report.assert_balanced(unstamped_ok=False)
    assert (report.accepted, report.tempfailed, report.rejected) == (1, 1, 1)
    assert report.delivered_after_tempfail == [temp.mid]  # allowed: the sender retries


def test_each_broken_promise_is_caught() -> None:
    ledger = Ledger()
    lost, dup, altered, unstamped, silent, rejected = (ledger.new() for _ in range(6))
    for e in (lost, dup, altered, unstamped):
        e.code = 250
    silent.failure = "eof"
    rejected.code = 554
    ghost = make_message(f"{ledger.run}.999@ledger.test")  # this run's form, never sent
    report = ledger.check([
        STAMP + dup.raw, STAMP + dup.raw,
        STAMP + altered.raw.replace(b"Subject:", b"Subject: [tag]"),
        unstamped.raw,
        STAMP + rejected.raw,
        STAMP + ghost,
        b"Subject: not ours\r\n\r\nx\r\n",
    ])
    assert report.lost == [lost.mid]
    assert report.duplicated == [dup.mid]
    assert report.altered == [altered.mid]
    assert report.unstamped == [unstamped.mid]
    assert report.unanswered == [f"{silent.mid} (eof)"]
    assert report.delivered_after_reject == [rejected.mid]
    assert report.foreign == 1 and report.phantom == [f"{ledger.run}.999@ledger.test"]
    assert set(report.errors) == {"lost", "duplicated", "altered", "unanswered", "delivered_after_reject", "phantom"}
