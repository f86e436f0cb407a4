"""Feature extraction: deterministic, well-formed ids, never raises on nasty input.

The corpus-wide and 10,000-mutation fuzz lives with the robustness work; this
is a quick sample of the shapes that break parsers.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import numpy as np
import pytest
from feature_checks import features_of
from hypothesis import given, settings
from hypothesis import strategies as st

from classifier.features import FEATURE_VERSION, FeatureParams, structure_ids
from classifier.labels import strip_leaks

P = FeatureParams()
SA = Path(__file__).resolve().parent.parent / "data-cache/spamassassin/package/data"

PLAIN = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Lunch on Friday?\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"Date: Tue, 1 Oct 2024 10:00:00 +0000\r\n"
    b"\r\n"
    b"Hi Bob, shall we have lunch on Friday at noon? Alice\r\n"
)

LIST = (
    b"From: Carol <carol@lists.example.org>\n"
    b"Subject: [dev] Re: build breaks on arm64\n"
    b"List-Id: <dev.lists.example.org>\n"
    b"List-Post: <mailto:dev@lists.example.org>\n"
    b"List-Unsubscribe: <mailto:dev-leave@lists.example.org>\n"
    b"Precedence: list\n"
    b'Content-Type: multipart/alternative; boundary="b1"\n'
    b"\n"
    b"--b1\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
    b"The build=20breaks on arm64 since the last commit.\n"
    b"--b1\nContent-Type: text/html\n\n<p>The build <b>breaks</b> on arm64</p><img src=x>\n"
    b"--b1--\n"
)


def _check(raw: bytes, p: FeatureParams = P) -> np.ndarray:
    """The ids of `raw` (never the error sentinel), well formed."""
    ids = features_of(raw, p)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ids.shape[0] >= p.struct_slots
    assert ids.min() >= 0 and ids.max() < p.buckets
    assert (ids[p.struct_slots :] > 0).all()  # text part is never padded
    assert ids[0] > 0  # every message yields structure tokens (prec:, ct:, ...)
    return ids


def test_deterministic_and_well_formed() -> None:
    a, b = _check(PLAIN), features_of(PLAIN, P)
    assert np.array_equal(a, b)
    assert (a[: P.struct_slots] > 0).sum() >= 5  # structure tokens present


def test_list_headers_and_mime_change_structure_tokens() -> None:
    plain = set(features_of(PLAIN, P)[: P.struct_slots].tolist()) - {0}
    lst = set(features_of(LIST, P)[: P.struct_slots].tolist()) - {0}
    assert len(lst - plain) >= 5
    # quoted-printable decoded: "build breaks" are words, not "build=20breaks"
    words = features_of(b"Subject: x\n\nbuild breaks", P)[P.struct_slots :]
    assert set(words.tolist()) <= set(features_of(LIST, P)[P.struct_slots :].tolist())


def test_case_and_digits_fold() -> None:
    a = features_of(b"Subject: s\n\nInvoice 12345 READY", P)[P.struct_slots :]
    b = features_of(b"Subject: s\n\ninvoice 99999 ready", P)[P.struct_slots :]
    assert a.shape[0] > 0 and np.array_equal(a, b)  # text read, then folded


def test_hash_params_change_ids() -> None:
    other = FeatureParams(seed=7)
    assert not np.array_equal(features_of(PLAIN, P), features_of(PLAIN, other))
    small = FeatureParams(buckets=1024)
    _check(PLAIN, small)


def test_text_cap_bounds_tokens() -> None:
    body = b" ".join(b"word%d" % i for i in range(200_000))
    ids = features_of(b"Subject: big\n\n" + body, P)
    assert P.struct_slots + P.max_body_tokens <= ids.shape[0]  # the body was read up to the cap
    assert ids.shape[0] <= P.struct_slots + 64 + 16 + 2 * P.max_body_tokens


def test_leak_headers_do_not_change_features() -> None:
    leaky = (
        b"X-Keywords: spam\nX-Status: RO\nX-Folder: \\inbox\n"
        b"Received: from x by spamassassin.taint.org with fetchmail\n" + PLAIN
    )
    assert np.array_equal(features_of(leaky, P), features_of(PLAIN, P))
    assert b"X-Keywords" not in strip_leaks(leaky) and b"taint.org" not in strip_leaks(leaky)


NASTY = [
    b"",
    b"\n",
    b"\r\n\r\n",
    b"no header at all, just text",
    b"\x00\xff" * 5000,
    b"Subject: =?utf-8?B?!!!notbase64?=\n\nx",
    b"Subject: =?x-unknown-charset?Q?caf=E9?=\nFrom: =?utf-8?q?=ZZ?= <a@b>\n\nx",
    b"Content-Type: text/plain; charset=no-such-charset\n\n\xe9\xe8 text",
    b'Content-Type: text/plain; charset="' + b"x" * 5000 + b'"\n\nbody',
    b"Content-Transfer-Encoding: base64\n\n!!!!====@@@@",
    b"Content-Transfer-Encoding: base64\n\nYWJj\nZGVm\nZ",
    b"Content-Transfer-Encoding: quoted-printable\n\n=\n=ZZ=4",
    b'Content-Type: multipart/mixed; boundary=""\n\n--\n--',
    b"Content-Type: multipart/mixed\n\nno boundary parameter",
    b"Content-Type: multipart/mixed; boundary=x\n\n--x\n\n--x--",
    b"Content-Type: multipart/mixed; boundary=x\n\n"
    + b"--x\nContent-Type: multipart/mixed; boundary=x\n\n" * 500,
    b"Content-Type: message/rfc822\n\n" * 200,
    b"Content-Type: text/html\n\n<html>" + b"<div>" * 20000 + b"<script>x</script>",
    b"Content-Type: text/html\n\n</p></html><<<>>>&#xffffffff;&nosuch;",
    b"From: " + b"<" * 10000 + b"\n\n",
    b"Subject: " + b"a" * 1_000_000 + b"\n\n",
    b"X" * (10 * 1024 * 1024),  # a 10 MB single line
    b"From:\n\tcontinued\n \n\nbody",
    b"From: a@b\r\nSubject: \xf0\x9f\x92\xb0 \xc3\xa9t\xc3\xa9\r\n\r\n\xff\xfe\xfd",
]


@pytest.mark.parametrize("raw", NASTY, ids=range(len(NASTY)))
def test_nasty_inputs_never_raise(raw: bytes) -> None:
    _check(raw)


def test_random_mutations_of_real_mail_never_raise() -> None:
    rng = random.Random(3)
    base = [PLAIN, LIST]
    files = sorted(SA.glob("spam-2/*.txt"))[:20] if SA.is_dir() else []
    base += [f.read_bytes() for f in files]
    for i in range(400):
        raw = bytearray(rng.choice(base))
        op = i % 4
        if op == 0:
            raw = raw[: rng.randrange(len(raw) + 1)]
        elif op == 1:
            for _ in range(20):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif op == 2:
            raw = raw.replace(b"boundary", b"boundry").replace(b"--", b"-")
        else:
            raw = raw.replace(b"charset=", b"charset=x-bogus-")
        _check(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_hypothesis_bytes(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"Subject: ",
                b"From: ",
                b"Content-Type: ",
                b"multipart/mixed; boundary=b",
                b"\n",
                b"\r\n",
                b"--b",
                b"=?utf-8?b?",
                b"?=",
                b"text/html",
                b"<a href=http://x>",
                b"base64",
                b"Content-Transfer-Encoding: ",
                b"\xff",
                b" ",
            ]
        ),
        max_size=60,
    )
)
def test_hypothesis_structured(parts: list[bytes]) -> None:
    _check(b"".join(parts))


def test_feature_version_is_positive_int() -> None:
    assert isinstance(FEATURE_VERSION, int) and FEATURE_VERSION >= 1


def test_weak_label_refinement_rules() -> None:
    from classifier.labels import refine_sa

    lst = b"From: a@x.org\nSubject: hi\nList-Id: <l.x.org>\nList-Post: <mailto:l@x.org>\n\nbody"
    tag_reply = b"From: a@x.org\nSubject: Re: [SAtalk] hi\n\nbody"
    tag_bulk = b"From: a@x.org\nSubject: [use Perl] Headlines\nPrecedence: bulk\n\nbody"
    newsletter = b"From: news@x.org\nSubject: Weekly news\n\nbody"
    reply = b"From: a@x.org\nSubject: Re: lunch\nIn-Reply-To: <1@x>\n\nbody"
    assert refine_sa("spam-2", lst, "spam") == (None, True, "spam-group")
    assert refine_sa("hard-ham-1", lst, "promotions/newsletter")[0] == "forums"
    assert refine_sa("hard-ham-1", newsletter, "promotions/newsletter")[0] == "promotions"
    assert refine_sa("easy-ham-1", tag_reply, "forums")[0] is None
    assert refine_sa("easy-ham-1", tag_bulk, "forums")[0] == "forums"
    assert refine_sa("easy-ham-1", lst, "forums") == ("forums", False, "kept")
    assert refine_sa("easy-ham-1", lst, "primary")[0] == "forums"
    assert refine_sa("easy-ham-1", newsletter, "primary")[0] is None
    assert refine_sa("easy-ham-1", reply, "primary")[0] == "primary"


def test_python_only_codecs_are_not_run_on_mail() -> None:
    """charset=unicode_escape would run Python's escape interpreter over the
    sender's bytes (and warn); it is read as latin-1 like an unknown charset."""
    import warnings


    body = b"caf\\xe9 \\N{BULLET} \\q"
    def message(charset: str) -> bytes:
        return (b"From: a@example.org\nSubject: x\nContent-Type: text/plain; charset="
                + charset.encode() + b"\n\n" + body + b"\n")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        escaped = features_of(message("unicode_escape"), P)
    assert list(escaped) == list(features_of(message("x-no-such-charset"), P))


def test_display_name_unrelated_to_the_address() -> None:
    """People's names share a word, a short form or initials with their address;
    a brand name over a throwaway address shares nothing (impersonation)."""
    (tok,) = structure_ids(["from-name-unrelated"], P).tolist()

    def unrelated(frm: bytes) -> bool:
        return tok in set(features_of(b"From: " + frm + b"\nSubject: hi\n\nhello\n", P)[: P.struct_slots].tolist())

    assert unrelated(b'"PayPal" <x7k2@q9z-secure.example>')
    assert unrelated(b"Netflix Support <billing-update@mailer.example>")
    assert not unrelated(b"Ann Lee <ann.lee@example.org>")
    assert not unrelated(b"Philip Reynolds <phil@example.org>")  # a short form
    assert not unrelated(b"Dave Long <dl@example.org>")  # initials
    assert not unrelated(b"Shop <shop@example.org>")


def test_reply_to_freemail_from_a_company() -> None:
    (tok,) = structure_ids(["replyto-freemail"], P).tolist()

    def has(frm: bytes, reply: bytes) -> bool:
        raw = b"From: " + frm + b"\nReply-To: " + reply + b"\nSubject: hi\n\nhello\n"
        return tok in set(features_of(raw, P)[: P.struct_slots].tolist())

    assert has(b"Bank <service@bank.example>", b"<bank.claims@gmail.com>")
    assert not has(b"Ann <ann@gmail.com>", b"<ann.lee@gmail.com>")  # a person's own webmail
    assert not has(b"Shop <news@shop.example>", b"<help@shop.example>")


P7 = FeatureParams(lure_signs=True, struct_digits=True)  # the trial flags, off by default


def test_structure_digits_only_with_the_flag() -> None:
    """Count buckets are distinct tokens with struct_digits; without it (the
    shipped model's ids) digits fold to "0" as in words."""
    assert len(set(structure_ids(["links:1", "links:4"], P7).tolist())) == 2
    assert len(set(structure_ids(["links:1", "links:4"], P).tolist())) == 1
    raw = b"From: a@example.org\nSubject: Click here\n\nClick here http://1.2.3.4/x\n"
    assert len(features_of(raw, P7)) == len(features_of(raw, P))
    assert list(features_of(raw, P)[P.struct_slots :]) == list(features_of(raw, P7)[P.struct_slots :])


def test_lure_signs_and_their_count() -> None:
    """Signs of mail dressed up to be clicked are tokens, and so is their count
    (the part that transfers from 2002 spam to today's phishing); plain wanted
    mail has none. Only with FeatureParams.lure_signs."""
    names = ["lure-mixed-script", "lure-invisible", "lure-name-pictograph",
             "lure-name-malformed", "lure-credential", "lure-click-here", "lure-form",
             "lure:one", "lure:two", "lure:many"]  # fmt: skip
    ids = dict(zip(structure_ids(names, P7).tolist(), names, strict=True))
    assert len(ids) == len(names)

    def lures(raw: bytes, p: FeatureParams = P7) -> set[str]:
        got = set(features_of(raw, p)[: p.struct_slots].tolist())
        return {ids[i] for i in got if i in ids}

    plain = b"From: Ann Lee <ann@example.org>\nSubject: lunch?\n\nLunch tomorrow at noon?\n"
    assert lures(plain) == set()
    homoglyph = "From: OpenSea <n@example.org>\nSubject: \u0421\u043engr\u0430tul\u0430tions\n\nhi\n".encode()
    assert lures(homoglyph) == {"lure-mixed-script", "lure:one"}
    phish = (
        'From: "PayPal 💸", "PayPal" <x@example.org>\nSubject: Account\n\n'
        "We noticed unusual sign-in activity. Click here to verify your account.\n"
    ).encode()
    assert lures(phish) == {
        "lure-name-pictograph", "lure-name-malformed", "lure-credential", "lure-click-here", "lure:many",
    }  # fmt: skip
    form = b"From: a@example.org\nContent-Type: text/html\n\n<form action=x><input></form>\n"
    assert lures(form) == {"lure-form", "lure:one"}
    # Zero-width padding between words (newsletter preheaders) is no sign.
    pad = "From: Shop <n@example.org>\nSubject: Sale \u200c \u200c now\n\nhi\n".encode()
    assert lures(pad) == set()
    # A split word is.
    split = "From: Shop <n@example.org>\nSubject: Mi\U000e0139cro\U000e0139soft\n\nhi\n".encode()
    assert lures(split) == {"lure-invisible", "lure:one"}
    off = msgspec.structs.replace(P7, lure_signs=False)
    assert lures(phish, off) == set()
