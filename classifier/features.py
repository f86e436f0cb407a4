"""Raw message bytes -> hashed token ids for the fastText-style model. Pure, no I/O.

Speed is the design constraint (>= 5,000 messages/s on one core, inference
included), so:
- headers are split by hand from the head only; only a whitelist of fields a
  filter really sees in production is read (never Received, To, X-Keywords,
  X-Folder...: those leak how a corpus was collected);
- MIME parts are found by boundary splitting of bytes, depth and count capped;
- tokens are hashed in numpy: a polynomial hash over the utf-8 bytes from
  uint64 wrap-around prefix sums, token bounds from a byte mask; bigrams come
  from adjacent token hashes. No Python call per token.

`extract` never raises: any failure inside yields the ids of an "error" token.
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterable, Sequence
from email.header import decode_header
from itertools import pairwise
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from classifier import headers

# Bump when tokens or hashing change: a model trained on other ids is refused.
FEATURE_VERSION: Final = 6

IdArray = npt.NDArray[np.int64]


class FeatureParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int = FEATURE_VERSION
    buckets: int = 1 << 16  # embedding rows; id 0 is padding
    seed: int = 0x5EED  # hash salt
    text_max_bytes: int = 16384  # decoded body text read per message
    raw_max_bytes: int = 1 << 20  # bytes of the raw message looked at at all
    header_max_bytes: int = 65536
    max_headers: int = 256
    max_body_tokens: int = 1500  # unigrams; bigrams add as many again
    max_parts: int = 64
    max_depth: int = 8
    bigrams: bool = True
    # The first `struct_slots` ids are structure tokens (header/MIME features),
    # 0-padded; the rest are text (subject, sender name, body). The model
    # averages the two bags apart, so a few stable structure signals are not
    # drowned by hundreds of words.
    struct_slots: int = 96
    # Off by default: the bundled model was trained without them, and a model
    # carries its FeatureParams (manifest), so one trained with them gets them.
    # lure_signs: tokens for signs of mail dressed up to be clicked, and their
    # count (`lure_tokens`). struct_digits: structure tokens keep their digits;
    # without it every count bucket ("links:3", "body-len:6") folds to one id.
    lure_signs: bool = False
    struct_digits: bool = False


# --- hashing -----------------------------------------------------------------

_P: Final = 0x100000001B3  # FNV prime: odd, so invertible mod 2**64
_M64: Final = (1 << 64) - 1
_TABLE_LEN: Final = 1 << 18  # longest buffer hashed (inputs are capped below it)


def _power_tables() -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    pw = np.full(_TABLE_LEN, _P, dtype=np.uint64)
    pw[0] = 1
    inv = np.full(_TABLE_LEN, pow(_P, -1, 1 << 64), dtype=np.uint64)
    inv[0] = 1
    return np.cumprod(pw, dtype=np.uint64), np.cumprod(inv, dtype=np.uint64)


_POW, _INV = _power_tables()

# Word bytes for text: a-z, 0-9 (after folding) and any non-ASCII byte.
_WORD = np.zeros(256, dtype=bool)
_WORD[ord("a") : ord("z") + 1] = True
_WORD[ord("0") : ord("9") + 1] = True
_WORD[0x80:] = True
# Header feature tokens are separated by whitespace only.
_NONSPACE = np.ones(256, dtype=bool)
_NONSPACE[[9, 10, 13, 32]] = False
# ASCII fold: upper -> lower, every digit -> "0" (numbers are noise, shapes are not).
_FOLD = np.arange(256, dtype=np.uint8)
_FOLD[ord("A") : ord("Z") + 1] += 32
_FOLD[ord("0") : ord("9") + 1] = ord("0")

_SALT_HDR: Final = 0x9E3779B97F4A7C15
_SALT_SUBJ: Final = 0xC2B2AE3D27D4EB4F
_SALT_NAME: Final = 0x165667B19E3779F9
_SALT_BODY: Final = 0x27D4EB2F165667C5
_SALT_BI: Final = 0x85EBCA77C2B2AE63


_S30: Final = np.uint64(30)
_S27: Final = np.uint64(27)
_S31: Final = np.uint64(31)
_M1: Final = np.uint64(0xBF58476D1CE4E5B9)
_M2: Final = np.uint64(0x94D049BB133111EB)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    # splitmix64 finaliser: spreads the polynomial hash over all bits. The
    # first step makes a new array; the rest work in it (per message, numpy's
    # per-call and allocation costs are most of the time, not the bytes).
    x = x ^ (x >> _S30)
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def _to_ids(h: npt.NDArray[np.uint64], p: FeatureParams) -> IdArray:
    return (h % np.uint64(p.buckets - 1)).astype(np.int64) + 1


# --- header and MIME parsing ---------------------------------------------------

_PARAM = re.compile(r'([A-Za-z0-9*_.-]+)\s*=\s*(?:"([^"]*)"|([^;\s]+))')
_ADDR = re.compile(r"<?([^<>\s@\"]+)@([A-Za-z0-9.\-]+)>?")
_DKIM_D = re.compile(r"(?:^|;)\s*d\s*=\s*([A-Za-z0-9.\-]+)")

_WANTED = frozenset(
    {
        "from", "reply-to", "subject", "sender", "content-type", "content-transfer-encoding",
        "content-disposition", "mime-version", "list-id", "list-post", "list-unsubscribe",
        "list-unsubscribe-post", "list-help", "list-subscribe", "list-archive", "list-owner",
        "mailing-list", "x-mailing-list", "x-beenthere", "x-mailman-version", "x-loop",
        "precedence", "auto-submitted", "feedback-id", "x-mailer", "user-agent", "dkim-signature",
        "in-reply-to", "references", "errors-to", "x-auto-response-suppress", "x-autoreply",
        "x-campaign", "x-mailgun-sid", "x-ses-outgoing", "x-sg-eid", "x-mc-user",
        "x-report-abuse", "x-csa-complaints", "x-priority", "importance", "organization",
        "date", "message-id", "cc", "x-failed-recipients",
    }
)  # fmt: skip
_KEYS = {v: n for n in _WANTED for v in (n.encode(), n.title().encode(), n.upper().encode())}


def _split_head(raw: bytes, p: FeatureParams) -> tuple[bytes, bytes]:
    """Head and body at the first empty line (classifier.headers), the head capped."""
    end, start = headers.split(raw, p.header_max_bytes)
    return raw[:end], raw[start:]


# Field name as written -> wanted key, or None for a field we skip; "" = not seen yet.
# Most heads repeat the same few dozen spellings (Received, X-Spam-Status...).
_NAMES: dict[bytes, str | None] = dict(_KEYS)


# Fields whose value is read; the other wanted fields count by presence only.
_VALUED = frozenset(
    {
        "from", "reply-to", "sender", "subject", "content-type", "content-transfer-encoding",
        "content-disposition", "precedence", "auto-submitted", "list-unsubscribe", "x-mailer",
        "user-agent", "dkim-signature", "list-unsubscribe-post",
    }
)  # fmt: skip


def _parse_headers(head: bytes, p: FeatureParams) -> dict[str, str]:
    """Whitelisted fields -> the first value, unfolded, decoded (UTF-8, else latin-1:
    never fails); "" for fields only their presence counts for. In head order."""
    out: dict[str, str] = {}
    n = 0
    names = _NAMES
    # One C-level scan finds every field (with its continuation lines); a dict
    # lookup keeps the wanted ones. Faster than one big case-insensitive alternation.
    for name, value in headers.FIELD.findall(head):
        key = names.get(name, "")
        if not key:
            if key is None:
                continue
            low = name.lower().decode("latin-1")
            key = low if low in _WANTED else None
            if len(names) < 8192 and len(name) <= 64:  # bounded memory on hostile heads
                names[name] = key
            if key is None:
                continue
        n += 1
        if n > p.max_headers:
            break
        if key in out:
            continue  # only the first value is read
        if key not in _VALUED:
            out[key] = ""
            continue
        value = headers.unfold(value)
        try:  # raw 8-bit headers are mostly UTF-8 today (RFC 6532); else latin-1
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        out[key] = text
    return out


def _first(h: dict[str, str], key: str) -> str:
    return h.get(key, "")


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words -> text; anything odd is kept as it came."""
    if "=?" not in value:
        return value
    try:
        parts = []
        for chunk, cs in decode_header(value):
            if isinstance(chunk, bytes):
                parts.append(_decode_text(chunk, cs or "latin-1"))
            else:
                parts.append(chunk)
        return "".join(parts)
    except Exception:
        return value


_PARAMS: dict[str, tuple[str, dict[str, str]]] = {}


def _params(value: str) -> tuple[str, dict[str, str]]:
    """(main value lowercased, parameters) of a MIME field; callers never mutate the dict."""
    got = _PARAMS.get(value)
    if got is None:
        got = _parse_params(value)
        # Boundaries are unique per message: not worth a cache slot.
        if len(_PARAMS) < 4096 and len(value) <= 256 and "boundary" not in value:
            _PARAMS[value] = got
    return got


def _parse_params(value: str) -> tuple[str, dict[str, str]]:
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(rest[:2048]):
        params.setdefault(m.group(1).lower(), m.group(2) if m.group(2) is not None else m.group(3))
    return main.strip().lower()[:64], params


_CODECS: dict[str, str] = {}
# Python codecs that are no mail charset: a sender must not make us run
# escape-sequence interpreters (or the "undefined" codec) over their bytes.
_NOT_MAIL_CHARSETS = frozenset(
    {"unicode-escape", "raw-unicode-escape", "undefined", "idna", "punycode"}
)


def _decode_text(data: bytes, charset: str) -> str:
    cs = charset.strip().strip('"').lower()[:40] or "us-ascii"
    name = _CODECS.get(cs)
    if name is None:
        try:
            name = codecs.lookup(cs).name
        except (LookupError, ValueError):
            name = "latin-1"  # unknown charset: bytes kept, words still hash
        if name in _NOT_MAIL_CHARSETS:
            name = "latin-1"
        if len(_CODECS) < 512:
            _CODECS[cs] = name
    try:
        return data.decode(name, errors="replace")
    except Exception:
        return data.decode("latin-1")


def _decode_cte(body: bytes, cte: str, cap: int) -> bytes:
    cte = cte.strip().lower()
    if cte == "base64":
        data = body[: cap * 4 // 3 + 8].translate(None, b" \t\r\n")
        data = data[: len(data) // 4 * 4]
        try:
            return binascii.a2b_base64(data)[:cap]
        except (binascii.Error, ValueError):
            return b""
    if cte == "quoted-printable":
        return binascii.a2b_qp(body[: cap * 3])[:cap]
    return body[:cap]


class _Leaf(msgspec.Struct):
    ctype: str
    charset: str
    cte: str
    attachment: bool
    filename: str
    body: bytes


def _walk(
    headers: dict[str, str], body: bytes, depth: int, p: FeatureParams, out: list[_Leaf]
) -> None:
    ctype, params = _params(_first(headers, "content-type") or "text/plain")
    if ctype.startswith("multipart/") and depth < p.max_depth and params.get("boundary"):
        delim = b"--" + params["boundary"].encode("latin-1", "replace")[:200]
        chunks = body.split(delim, p.max_parts + 1)
        for chunk in chunks[1 : p.max_parts + 1]:
            if chunk.startswith(b"--") or len(out) >= p.max_parts:
                break  # closing delimiter
            chunk = chunk.lstrip(b" \t").removeprefix(b"\r\n").removeprefix(b"\n")
            if chunk[:2] in (b"\n", b"\r\n") or chunk[:1] == b"\n":
                part_head, part_body = b"", chunk.lstrip(b"\r\n")
            else:
                part_head, part_body = _split_head(chunk, p)
            _walk(_parse_headers(part_head, p), part_body, depth + 1, p, out)
        return
    if ctype == "message/rfc822" and depth < p.max_depth:
        # Some MTAs put a stray empty line between the part's header and the
        # message it carries (sisimai's lhost-x3 DSNs): read past one, as the
        # model was trained to. Only here: a top-level message that starts
        # with an empty line has no header, for stamping and features alike.
        if body[:1] == b"\n":
            body = body[1:]
        elif body[:2] == b"\r\n":
            body = body[2:]
        inner_head, inner_body = _split_head(body, p)
        out.append(_Leaf(ctype, "", "", False, "", b""))
        _walk(_parse_headers(inner_head, p), inner_body, depth + 1, p, out)
        return
    disp, dparams = _params(_first(headers, "content-disposition"))
    filename = dparams.get("filename") or params.get("name") or ""
    out.append(
        _Leaf(
            ctype=ctype,
            charset=params.get("charset", ""),
            cte=_first(headers, "content-transfer-encoding"),
            attachment=disp == "attachment" or bool(filename),
            filename=filename[:200],
            body=body,
        )
    )


def _html_text(html: str) -> str:
    from selectolax.lexbor import LexborHTMLParser

    try:
        tree = LexborHTMLParser(html)
        root = tree.body or tree.root
        if root is None:
            return ""
        text: str = root.text(separator=" ")
        return text
    except Exception:
        return ""


# --- feature tokens -------------------------------------------------------------


_BUCKETS: Final = tuple(str(i.bit_length()) for i in range(4097))


def _bucket(n: int) -> str:
    """Coarse log2 buckets so counts become tokens: 0, 1, 2-3, 4-7, ..."""
    return _BUCKETS[n] if 0 <= n <= 4096 else str(min(n, 1 << 12).bit_length())


def _domain(addr_value: str) -> tuple[str, str, str]:
    """(display name, local part, domain) of the first address in a header value."""
    m = _ADDR.search(addr_value[:1024])
    if m is None:
        return addr_value[:200].strip().strip('"'), "", ""
    name = addr_value[: m.start()].strip().strip('"').strip()
    if not name and "(" in addr_value:  # old style: addr (Name)
        name = addr_value[addr_value.find("(") + 1 : addr_value.rfind(")")]
    return name[:200], m.group(1).lower()[:64], m.group(2).lower().rstrip(".")[:255]


_ORGS: dict[str, str] = {}


def _org(domain: str) -> str:
    # Organisational domain, roughly: the last two labels (three for co.uk-style).
    org = _ORGS.get(domain)
    if org is None:
        labels = domain.split(".")
        if len(labels) >= 3 and len(labels[-2]) <= 3 and len(labels[-1]) == 2:
            org = ".".join(labels[-3:])
        else:
            org = ".".join(labels[-2:])
        if len(_ORGS) < 8192:  # bounded: a flood of random domains cannot grow it
            _ORGS[domain] = org
    return org


_FREEMAIL = frozenset(
    "gmail.com yahoo.com hotmail.com outlook.com aol.com msn.com live.com mail.com gmx.de "
    "gmx.net web.de yandex.ru mail.ru icloud.com me.com protonmail.com qq.com 163.com".split()
)
_ROLE = re.compile(
    r"(no-?reply|do-?not-?reply|notifications?|alerts?|news(letter)?|info|marketing|"
    r"offers?|deals?|promo|sales|support|service|billing|account|team|hello|mailer-daemon|"
    r"postmaster|bounces?|root|cron|admin|owner-|-request|-admin|orders?|receipts?|"
    r"tracking|shipment|shipping|security|confirm|bookings?|reservations?|invoices?|"
    r"rss|feeds?|verify|updates?|auto-?reply)"
)
# Role families, so one seen role teaches its kin (the corpora have bounces and
# RSS feeds, hardly any shop or bank notifications): mail a system sends about
# something the recipient did or owns, and mail a marketing team sends.
_ROLE_FAMILY = {
    **dict.fromkeys(
        "no-reply noreply do-not-reply donotreply notification notifications alert alerts "
        "billing account mailer-daemon postmaster bounce bounces root cron order orders "
        "receipt receipts tracking shipment shipping security confirm booking bookings "
        "reservation reservations invoice invoices rss feed feeds verify update updates "
        "auto-reply autoreply".split(),
        "from-automated",
    ),
    **dict.fromkeys(
        "news newsletter marketing offer offers deal deals promo sales hello info".split(),
        "from-marketing",
    ),
}
_DIGIT = re.compile(r"[0-9]")
_ALPHA = re.compile(r"[^\W\d_]")
_UPPER = re.compile(r"[A-Z\u00c0-\u00de]")
_SYMBOL = re.compile(r"[\u2000-\U0010ffff]")
_DIGIT_MIX = re.compile(r"[a-z]+[0-9]+[a-z]+[0-9a-z]*[0-9]|[0-9][a-z]+[0-9]")
_CONSONANTS = re.compile(r"[bcdfghjklmnpqrstvwxz]{5,}")
_LINK = re.compile(rb"https?://([a-z0-9][a-z0-9.\-]{0,200})")
_IPV4 = re.compile(r"^\d+\.\d+$")  # _org() of a dotted quad keeps its last two numbers
_SHORTENERS = frozenset(
    "bit.ly t.co tinyurl.com goo.gl ow.ly is.gd buff.ly cutt.ly rb.gy t.ly".split()
)
_NAME_WORD = re.compile(r"[^\W\d_]+")
_ANCHOR = re.compile(
    rb"<a\s[^>]{0,512}href=[\"']?https?://([a-z0-9.\-]{1,253}+)[^>]{0,1024}+>\s*(?:https?://)?(?:www\.)?([a-z0-9\-]{1,63}\.[a-z0-9.\-]{1,253})"
)  # bounded: unbounded took minutes on 64 KB of "<a href=http://a"
_MAILER = re.compile(r"[A-Za-z][A-Za-z\-]+")


_ASCII_LETTERS: Final = bytes(range(65, 91)) + bytes(range(97, 123))
_ASCII_UPPER: Final = bytes(range(65, 91))
_DOMS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {}


_RESERVED_TLDS = frozenset({"example", "test", "invalid", "localhost"})
_RESERVED_ORGS = frozenset({"example.com", "example.net", "example.org"})


def _reserved(dom: str) -> bool:
    tld = dom.rsplit(".", 1)[-1]
    if tld in _RESERVED_TLDS:
        return True
    labels = dom.split(".")
    # example.com/.net/.org (RFC 2606 3) and example.<ccTLD> as anonymisers use it.
    return ".".join(labels[-2:]) in _RESERVED_ORGS or (
        len(labels) >= 2 and "example" in labels[-3:-1]
    )


def _domain_tokens(dom: str) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """(org, its first label, tld/freemail tokens, label-shape tokens) of a From domain.

    Cached: senders repeat, and these are a dozen string and regex calls."""
    got = _DOMS.get(dom)
    if got is not None:
        return got
    org = _org(dom) if dom else ""
    # No TLD token for names reserved for examples (RFC 2606, RFC 6761): real
    # senders never use them; anonymised corpora do (the bounce set's
    # example.jp / example.com), so their TLD would teach how a corpus was
    # anonymised ("a .org sender is a bounce"), not who sends mail.
    a = [] if _reserved(dom) else ["from-tld:" + dom.rsplit(".", 1)[-1][:10]]
    if dom in _FREEMAIL:
        a.append("from-freemail")
    labels = dom.split(".") if dom else []
    b = ["from-labels:" + str(min(len(labels), 6))]
    if any(len(x) >= 15 for x in labels[:-1]):
        b.append("from-long-label")
    if _DIGIT_MIX.search(dom):
        b.append("from-digit-mix")
    if _CONSONANTS.search(dom):
        b.append("from-consonant-run")  # random-looking throwaway domains
    got = (org, org.split(".")[0], tuple(a), tuple(b))
    if len(_DOMS) < 8192:
        _DOMS[dom] = got
    return got


# Tokens only mail of the DKIM era (2005+) can carry. The 1999-2002 corpora
# have none of them, so a model could learn "has it = ham" from the era of its
# data alone; the default recipe (models/default_recipe.py) neutralises that
# by giving old messages these tokens at the rates modern mail of the same
# spam label has them. Keep this list in step with sender_signal_tokens().
MODERN_ONLY_TOKENS: Final = (
    "sig:dkim", "sig:one-click", "h+feedback-id",
    "h+list-unsubscribe-post",
)  # fmt: skip


def sender_signal_tokens(h: dict[str, str], from_org: str) -> list[str]:
    """Signals of a sender that stands behind its mail, read from the message alone
    (not verified here: a DKIM signature is a claim until a verifier upstream
    checks it, see classifier.auth for Authentication-Results):

    - a DKIM signature with a `d=` (RFC 6376): "sig:dkim". Whether `d=` is
      in the From organisation (RFC 7489 alignment) is not said: unverified,
      alignment is a claim any sender makes by signing its own throwaway
      domain, and the corpora's modern spam (ESP-sent) never had it while a
      quarter of phishing-pot does, so the model learned "aligned = ham"
      (v2: 39% of the phishing it missed was aligned). Verified alignment is
      DMARC, honoured from a trusted verifier in classifier.auth;
    - RFC 8058 one-click unsubscribe: List-Unsubscribe-Post:
      List-Unsubscribe=One-Click with an https List-Unsubscribe: "sig:one-click".
    Feedback-ID (the bulk senders' complaint-loop id) counts by presence ("h+feedback-id").
    """
    out: list[str] = []
    dkim = _first(h, "dkim-signature")
    if dkim:
        m = _DKIM_D.search(dkim[:2048])
        if m is not None:
            d = m.group(1).lower().rstrip(".")
            if d:
                out.append("sig:dkim")
    post = _first(h, "list-unsubscribe-post").lower().replace(" ", "")
    if "list-unsubscribe=one-click" in post and "https:" in _first(h, "list-unsubscribe").lower():
        out.append("sig:one-click")
    return out


def _is_bulk(h: dict[str, str]) -> bool:
    """Any header of mail sent to many: list fields (RFC 2369/2919), Precedence, Feedback-ID."""
    return (
        "list-unsubscribe" in h
        or "list-id" in h
        or "list-post" in h
        or "feedback-id" in h
        or _first(h, "precedence").lower() in ("bulk", "list", "junk")
    )


def structure_ids(tokens: Sequence[str], params: FeatureParams) -> IdArray:
    """The ids `extract` gives these structure tokens (for training-time augmentation)."""
    hdr = " ".join(tokens).encode()
    ids = _hash_one(_Prepared(hdr, b"\n\n", (1, 2)), params)
    return ids[: len(tokens)].copy()


# Presence of these fields is a token ("h+list-id"); absence says nothing.
_PRESENT = {
    k: "h+" + k
    for k in (
        "list-id", "list-post", "list-unsubscribe", "list-unsubscribe-post", "list-help",
        "list-subscribe", "list-archive", "list-owner", "mailing-list", "x-mailing-list",
        "x-beenthere", "x-mailman-version", "x-loop", "feedback-id", "in-reply-to",
        "references", "errors-to", "x-auto-response-suppress", "x-autoreply", "x-campaign",
        "x-mailgun-sid", "x-ses-outgoing", "x-sg-eid", "x-mc-user", "x-report-abuse",
        "x-csa-complaints", "x-priority", "importance", "organization", "sender", "reply-to",
        "cc", "x-failed-recipients",
    )
}  # fmt: skip
# Not tokens: Date, Message-ID and MIME-Version. A submission server adds the
# first two to nearly all real mail, so their presence says how a corpus was
# collected or redacted (the hand-redacted shipping notices lack them, Enron
# never does), and the model had learned "a bare note without them is a
# shipping notice" (issue 11's "lunch?" came out `updates`).


def _name_related(names: list[str], local: str, dom: str) -> bool:
    """Whether a From display name shares something with its address, as people's
    names do: a word of it in the address ("Ann Lee" <ann@>), a word's first four
    letters in the local part ("Philip Reynolds" <phil@>), or its initials
    starting the local part ("Dave Long" <dl@>). Without the last two, a third
    of 2002 person-to-person and list mail read as "unrelated", as brand names
    over throwaway addresses do ("PayPal" <x7@q9z.shop>), and the token said
    little. True when the name has no word of 3 letters or more (nothing to compare)."""
    words = [w for w in names if len(w) >= 3]
    if not words:
        return True
    addr = local + "." + dom
    if any(w in addr for w in words) or any(w[:4] in local for w in words if len(w) >= 4):
        return True
    return len(names) >= 2 and local.startswith("".join(w[0] for w in names[:4]))


def _header_tokens(
    h: dict[str, str],
    subject: str,
    leaves: list[_Leaf],
    body: bytes,
    sender: tuple[str, str, str],
) -> list[str]:
    t = [_PRESENT[k] for k in h if k in _PRESENT]
    add = t.append
    add("prec:" + _first(h, "precedence").lower()[:20])
    add("auto:" + _first(h, "auto-submitted").lower().split(";")[0][:30])
    if "list-unsubscribe" in h and "list-post" not in h:
        add("oneway-unsub")  # RFC 2369: a list without a post address is one-way
    lu = _first(h, "list-unsubscribe").lower()
    if "mailto:" in lu:
        add("unsub:mailto")
    if "http" in lu:
        add("unsub:http")

    name, local, dom = sender
    org, org_head, dom_a, dom_b = _domain_tokens(dom)
    add("from-has-name" if name else "from-no-name")
    t.extend(dom_a)
    families = set()
    for role in _ROLE.findall(local)[:3]:
        add("from-role:" + role[0])
        families.add(_ROLE_FAMILY.get(role[0], "from-role-other"))
    t.extend(sorted(families))
    if _DIGIT.search(local):
        add("from-local-digits")
    if name and "@" in name:
        add("from-name-has-at")
    if name and dom and org_head in name.lower().replace(" ", ""):
        add("from-name-has-domain")
    if name and local:
        # Display name unrelated to the address ("PayPal" <x7@q9z.shop>):
        # impersonation; people and real senders share a word with it.
        if not _name_related(_NAME_WORD.findall(name.lower())[:8], local, dom):
            add("from-name-unrelated")
    t.extend(dom_b)
    if "@" in subject:
        add("subj-has-addr")
    rdom = _domain(_first(h, "reply-to"))[2] if "reply-to" in h else ""
    if rdom:
        add("replyto-same-org" if _org(rdom) == org else "replyto-other-org")
        if rdom in _FREEMAIL and dom not in _FREEMAIL:
            # A company's mail whose replies go to a webmail box: advance-fee
            # and business-email-compromise fraud (no real sender does this).
            add("replyto-freemail")
    sdom = _domain(_first(h, "sender"))[2] if "sender" in h else ""
    if sdom:
        add("sender-same-org" if _org(sdom) == org else "sender-other-org")
    t.extend(sender_signal_tokens(h, org))
    # Charset and transfer-encoding tokens are left out on purpose: 2002 spam
    # used other charsets than today's. A site training on its own mail may add them back.
    mailer = _first(h, "x-mailer") or _first(h, "user-agent")
    if mailer:
        fam = _MAILER.findall(mailer[:100])
        add("mailer:" + (fam[0].lower() if fam else "?"))

    low = subject.lower()
    add("subj-len:" + _bucket(len(subject)))
    if not subject:
        add("subj-empty")
    if low.startswith(("re:", "aw:", "sv:")):
        add("subj-re")
    if low.startswith(("fwd:", "fw:", "wg:")):
        add("subj-fwd")
    if subject.startswith("["):
        add("subj-tag")
    if "!" in subject:
        add("subj-excl")
    if "$" in subject or "%" in subject:
        add("subj-money")
    if subject.isascii():
        # Same counts as the regexes below: in ASCII, [^\W\d_] is a-zA-Z.
        sb = subject.encode("ascii")
        n_alpha = len(sb) - len(sb.translate(None, _ASCII_LETTERS))
        if n_alpha >= 6:
            n_upper = len(sb) - len(sb.translate(None, _ASCII_UPPER))
            add("subj-caps:" + str(n_upper * 4 // n_alpha))
    else:
        n_alpha = len(_ALPHA.findall(subject))
        if n_alpha >= 6:
            add("subj-caps:" + str(len(_UPPER.findall(subject)) * 4 // n_alpha))
        if _SYMBOL.search(subject):
            add("subj-symbols")  # emoji and pictographs
    if "=?" in _first(h, "subject"):
        add("subj-encoded")

    # MIME structure.
    top, _ = _params(_first(h, "content-type") or "text/plain")
    add("ct:" + top)
    kinds = [leaf.ctype for leaf in leaves]
    add("parts:" + _bucket(len(leaves)))
    has_plain, has_html = "text/plain" in kinds, "text/html" in kinds
    add("html-only" if has_html and not has_plain else ("html+plain" if has_html else "plain-only"))
    n_att = 0
    for leaf in leaves[:16]:
        if leaf.attachment:
            n_att += 1
            ext = leaf.filename.rsplit(".", 1)[-1].lower()[:8] if "." in leaf.filename else ""
            add("att:" + leaf.ctype.split("/")[0] + ":" + ext)
        elif not leaf.ctype.startswith("text/"):
            add("part:" + leaf.ctype[:40])
    add("attachments:" + _bucket(n_att))
    low_body = body[:65536].lower()
    add("links:" + _bucket(low_body.count(b"http://") + low_body.count(b"https://")))
    add("imgs:" + _bucket(low_body.count(b"<img")))
    # Links repeat within a message: each distinct host is decoded once.
    link_orgs = {
        _org(d.decode("latin-1").rstrip(".")) for d in set(_LINK.findall(low_body, 0, 65536)[:64])
    }
    if link_orgs:
        add("link-orgs:" + _bucket(len(link_orgs)))
        add("link-from-org" if org in link_orgs else "link-no-from-org")
        for lo in sorted(link_orgs)[:8]:
            if _IPV4.match(lo):
                add("link-ip")
            else:
                add("link-tld:" + lo.rsplit(".", 1)[-1][:10])
            if lo in _SHORTENERS:
                add("link-shortener")
    add("body-len:" + _bucket(len(body) >> 8))
    for href, shown in _ANCHOR.findall(low_body, 0, 65536)[:32]:
        if _org(href.decode("latin-1")) != _org(shown.decode("latin-1")):
            add("link-text-mismatch")  # <a href=evil>https://bank.example</a>
            break
    if b"unsubscribe" in low_body:
        add("body-unsub")
    elif not _is_bulk(h):
        # No sign of bulk mail at all, said as a token: a mean of embeddings
        # cannot see an absence, and "nothing list-like" is what person-to-person
        # and transactional mail share (without it a short personal note
        # was left to the class priors, and list mail is the biggest class).
        add("bulk:none")
    return t


def _body_text(leaves: list[_Leaf], p: FeatureParams) -> str:
    cap = p.text_max_bytes
    plain = [leaf for leaf in leaves if leaf.ctype == "text/plain" and not leaf.attachment]
    html = [leaf for leaf in leaves if leaf.ctype == "text/html" and not leaf.attachment]
    texts: list[str] = []
    size = 0
    for leaf in plain or html:
        if size >= cap:
            break
        data = _decode_cte(leaf.body, leaf.cte, cap - size)
        text = _decode_text(data, leaf.charset or "latin-1")
        if leaf.ctype == "text/html":
            text = _html_text(text)
        texts.append(text)
        size += len(data)
    return " ".join(texts)


# --- lure signals (feature version 7) ---------------------------------------------
#
# Signs of mail dressed up to be clicked, each rare in wanted mail of any era.
# Today's phishing imitates shop and delivery mail in words and layout, and the
# training corpora have almost none of it (their modern spam is advance-fee
# scams), so a token only today's phishing carries would get no weight. The
# count of signs ("lure:two") is the part that transfers: 2002 spam carries other
# signs of the same kind (IP-literal links, "click here"), so the model learns
# what a count means, and a message with new kinds of signs shares the token.

# A Latin letter next to a Cyrillic or Greek one: homoglyph words (a Cyrillic "a" in "Congrats").
_MIXED_SCRIPT = re.compile(
    r"[A-Za-z][\u0370-\u03ff\u0400-\u04ff]|[\u0370-\u03ff\u0400-\u04ff][A-Za-z]"
)
# An invisible character inside a word (tags, variation selectors, soft hyphen,
# joiners): words split so filters miss them. Not between words: newsletters
# pad their preheader with zero-width characters.
_INVISIBLE_IN_WORD = re.compile(
    r"\w[\U000e0000-\U000e01ef\u00ad\u034f\u200b\u200c\u200d\u2060\ufeff]+\w"
)
_PICTOGRAPH = re.compile(r"[\u2600-\u27bf\U0001f000-\U0001faff]")
# Lure phrases (English), matched in lowercased text: each pattern is tried
# only where one of its first words occurs (str.find), since a regex that
# starts with an alternation or a word boundary scans every position (30-60 us
# on 8 KB). Not "mailbox full" (bounces say it) nor "confirm your email"
# (every sign-up does).
_CREDENTIAL = re.compile(
    r"(?:verify|confirm|validate|restore|reactivate|unlock)\s+(?:your|the)\s+"
    r"(?:account|identity|password|payment|billing|card|mailbox|access)"
    r"|(?:unusual|suspicious|unauthori[sz]ed|unrecogni[sz]ed)\s+"
    r"(?:sign-?in|log-?in|login|activity|access|attempt|transaction)"
    r"|password\b.{0,30}\bexpir",
    re.S,
)
_CREDENTIAL_STARTS: Final = (
    "verify", "confirm", "validate", "restore", "reactivate", "unlock", "unusual",
    "suspicious", "unauthori", "unrecogni", "password",
)  # fmt: skip
_PRIZE = re.compile(r"you(?:'ve| have)? (?:won|been (?:selected|chosen))\b|claim your (?:prize|reward|gift)")
_PRIZE_STARTS: Final = ("you", "claim your")
_CLICK_HERE = re.compile(r"click\s+(?:here|below)\b")
_CLICK_STARTS: Final = ("click",)


def _phrase(words: str, starts: Sequence[str], rx: re.Pattern[str]) -> bool:
    """Whether `rx` matches at a word start where one of `starts` occurs."""
    for lit in starts:
        i = words.find(lit)
        tries = 0
        while i >= 0 and tries < 64:  # bounded: a page of "you you you"
            if (i == 0 or not words[i - 1].isalnum()) and rx.match(words, i):
                return True
            i = words.find(lit, i + 1)
            tries += 1
    return False


_RISKY_EXT = frozenset("html htm shtml xhtml svg zip rar 7z iso img exe scr js vbs jar".split())
# Structure tokens of _header_tokens that are lure signs too.
_LURE_TOKENS = frozenset(
    "link-ip link-text-mismatch link-shortener replyto-freemail subj-has-addr "
    "from-digit-mix from-consonant-run from-name-has-at".split()
)


_LURE_COUNT: Final = ("", "lure:one", "lure:two", "lure:many")


def lure_tokens(
    struct: Sequence[str], subject: str, name: str, text: str, body: bytes, leaves: list[_Leaf]
) -> list[str]:
    """One token per lure sign found, and their count ("lure:one", "lure:two",
    "lure:many" for three or more); nothing when there is none."""
    out: list[str] = []
    n = len(_LURE_TOKENS.intersection(struct))
    head = subject + "\n" + name
    head_ascii = head.isascii()
    start = text[:4096]
    if (not head_ascii and _MIXED_SCRIPT.search(head)) or (
        not start.isascii() and _MIXED_SCRIPT.search(start)
    ):
        out.append("lure-mixed-script")
    if not head_ascii and _INVISIBLE_IN_WORD.search(head):
        out.append("lure-invisible")
    if not head_ascii and _PICTOGRAPH.search(name):
        out.append("lure-name-pictograph")  # brands write their name, not emoji
    if '"' in name:
        # A display name with a quote left inside ('PayPal", "PayPal'): botched
        # by a bulk tool. Angle brackets alone are the null sender ("MAILER-DAEMON <>").
        out.append("lure-name-malformed")
    words = text[:8192].lower()
    if _phrase(words, _CREDENTIAL_STARTS, _CREDENTIAL):
        out.append("lure-credential")
    if ("won" in words or "been " in words or "claim your" in words) and _phrase(
        words, _PRIZE_STARTS, _PRIZE
    ):
        out.append("lure-prize")
    if _phrase(words, _CLICK_STARTS, _CLICK_HERE):
        out.append("lure-click-here")
    low = body[:65536].lower()
    if b"<form" in low:
        out.append("lure-form")  # a form in the mail itself
    if b"://xn--" in low or b".xn--" in low:
        out.append("lure-punycode")
    for leaf in leaves[:16]:
        if leaf.attachment and leaf.filename.rsplit(".", 1)[-1].lower() in _RISKY_EXT:
            out.append("lure-attachment")  # HTML, archives, disk images, scripts
            break
    n += len(out)
    if n:
        # In words: digits of structure tokens fold to "0" unless struct_digits.
        out.append(_LURE_COUNT[min(n, 3)])
    return out


class _Prepared(msgspec.Struct):
    """One message reduced to bytes to hash: structure tokens apart from the text."""

    hdr: bytes  # structure tokens, space separated
    text: bytes  # subject, sender name and body joined by newlines
    cuts: tuple[int, int]  # offsets in `text` where the name and the body start


def _prepare(raw: bytes, p: FeatureParams) -> _Prepared:
    raw = raw[: p.raw_max_bytes]
    head, body = _split_head(raw, p)
    h = _parse_headers(head, p)
    leaves: list[_Leaf] = []
    _walk(h, body, 0, p, leaves)
    subject = _decode_words(_first(h, "subject"))[:1000]
    sender = _domain(_decode_words(_first(h, "from")))
    name = sender[0]
    text = _body_text(leaves, p)
    tokens = _header_tokens(h, subject, leaves, body, sender)
    if p.lure_signs:
        tokens.extend(lure_tokens(tokens, subject, name, text, body, leaves))
    tokens.append("text-len:" + _bucket(len(text) >> 6))  # decoded words, not markup
    subj = subject.encode("utf-8", "replace")
    nm = name.encode("utf-8", "replace")
    c2 = len(subj) + 1
    c3 = c2 + len(nm) + 1
    return _Prepared(
        " ".join(tokens).encode(), b"\n".join([subj, nm, text.encode("utf-8", "replace")]), (c2, c3)
    )


_ERROR = _Prepared(b"extract-error", b"\n\n", (1, 2))

# Fold and token masks as bytes.translate tables (C speed, one byte out per
# byte in); the masks are of the folded byte, so they apply to raw bytes.
_FOLD_T: Final = _FOLD.tobytes()
# Structure tokens fold case only with FeatureParams.struct_digits: their digits
# are meaning ("links:3" is not "links:4"). Without it (feature version 6 as
# shipped) they fold to "0" like words', so every count bucket (lengths, links,
# images, parts) hashes to one id.
_CASE_T: Final = bytes(range(65)) + bytes(range(97, 123)) + bytes(range(91, 256))
_WORD_T: Final = _WORD[_FOLD].astype(np.uint8).tobytes()
_NONSPACE_T: Final = _NONSPACE[_FOLD].astype(np.uint8).tobytes()
_SEG: Final = np.array([1, 2, 3], dtype=np.int64)


Spans = npt.NDArray[np.int64]


def _token_spans(hdr: bytes, text: bytes) -> tuple[bytes, Spans, Spans, Spans]:
    """The bytes `hdr`, newline, `text`, and their token spans (starts, ends, lengths).

    Structure tokens (in `hdr`) split on whitespace, text tokens on word bytes;
    tokens of 2..40 bytes are kept.
    """
    joined = hdr + b"\n" + text
    m = np.frombuffer(
        b"\0" + hdr.translate(_NONSPACE_T) + b"\0" + text.translate(_WORD_T) + b"\0",
        dtype=np.int8,
    )
    # Token bounds alternate in the nonzero positions of the mask's difference.
    edges = np.flatnonzero(m[1:] != m[:-1])
    starts, ends = edges[0::2], edges[1::2]
    lens = ends - starts
    keep = (lens >= 2) & (lens <= 40)
    return joined, starts[keep], ends[keep], lens[keep]


def _span_hashes(
    joined: bytes, starts: Spans, ends: Spans, lens: Spans, hdr_end: int
) -> npt.NDArray[np.uint64]:
    """Polynomial hash of each span of the case-folded bytes, from one
    uint64 prefix sum (wrap-around arithmetic), plus its length.

    Only the bytes up to the last span's end are summed: spans come in order
    (ends ascending), and nothing after the last one changes a hash. That is
    most of a message whose body is past max_body_tokens, or whose lines are
    too long to be tokens."""
    n = int(ends[-1]) if ends.shape[0] else 0
    # Structure tokens (before `hdr_end`) fold case only, text folds digits too.
    cut = min(hdr_end, n)
    folded = joined[:n].translate(_FOLD_T)
    if cut:
        folded = joined[:cut].translate(_CASE_T) + folded[cut:]
    buf = np.frombuffer(folded, dtype=np.uint8)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(buf * _POW[:n], dtype=np.uint64, out=prefix[1:])
    h = (prefix[ends] - prefix[starts]) * _INV[starts]
    h += lens.astype(np.uint64) * np.uint64(0x9E3779B1)
    return h


def _hash_batch(items: Sequence[_Prepared], p: FeatureParams) -> list[IdArray]:
    """Token ids of prepared messages, one numpy pass for the whole batch.

    Layout: every message's structure tokens first (split on whitespace), then
    every message's text (split on word bytes), each joined by newlines (never
    part of a token), so each region gets its mask from one translate and no
    per-byte "which segment" array is needed. A token's message and segment
    (0 structure, 1 subject, 2 name, 3 body; the segment picks the hash salt)
    come from the token counts between segment starts.
    """
    k = len(items)
    hdrs = b"\n".join([it.hdr for it in items])
    texts = b"\n".join([it.text for it in items])
    joined, starts, ends, lens = _token_spans(hdrs, texts)
    # Segment starts in layout order, and each segment's id 4 * message + segment.
    hsizes = np.fromiter((len(it.hdr) + 1 for it in items), dtype=np.int64, count=k)
    tsizes = np.fromiter((len(it.text) + 1 for it in items), dtype=np.int64, count=k)
    tbase = len(hdrs) + 1 + np.cumsum(tsizes) - tsizes
    cuts = np.array([it.cuts for it in items], dtype=np.int64).reshape(k, 2)
    bounds = np.concatenate(
        [np.cumsum(hsizes) - hsizes, np.column_stack([tbase, tbase[:, None] + cuts]).ravel()]
    )
    four = np.arange(k, dtype=np.int64) * 4
    labels = np.concatenate([four, (four[:, None] + _SEG).ravel()])
    first = np.searchsorted(starts, bounds, side="left")  # first token of each segment
    seg = np.repeat(np.arange(4 * k), np.diff(first, append=starts.shape[0]))
    rank = np.arange(starts.shape[0]) - first[seg]
    g = labels[seg]
    kind = g & 3
    if rank.shape[0] and int(rank.max()) >= p.max_body_tokens:  # else nothing to cap
        keep = (kind != 3) | (rank < p.max_body_tokens)
        starts, ends, lens, g, kind, rank = (
            starts[keep],
            ends[keep],
            lens[keep],
            g[keep],
            kind[keep],
            rank[keep],
        )
    h = _span_hashes(joined, starts, ends, lens, len(hdrs) if p.struct_digits else 0)
    h = _mix(h ^ _segment_salts(p.seed)[kind])
    ids = _to_ids(h, p)
    msg = g >> 2
    slots = p.struct_slots
    # Row i: `slots` structure ids (0-padded), its text ids (subject, name,
    # body), then its bigrams; all rows scattered into one flat array. Text
    # tokens sit in message order in the layout, as the rows want them.
    counts = np.bincount(g, minlength=4 * k).reshape(k, 4)
    n_text = counts[:, 1:].sum(axis=1)
    if p.bigrams:
        body = np.flatnonzero(kind == 3)
        pair = msg[body[1:]] == msg[body[:-1]]
        b0, b1 = body[:-1][pair], body[1:][pair]
        bi = _to_ids(_mix(h[b0] * np.uint64(0x2545F4914F6CDD1D) + h[b1] + np.uint64(_SALT_BI)), p)
        bi_msg = msg[b0]
        n_bi = np.bincount(bi_msg, minlength=k)
    else:
        n_bi = np.zeros(k, dtype=np.int64)
    row_len = slots + n_text + n_bi
    row_start = np.cumsum(row_len) - row_len
    flat = np.zeros(int(row_len.sum()), dtype=np.int64)
    struct = (kind == 0) & (rank < slots)
    flat[row_start[msg[struct]] + rank[struct]] = ids[struct]
    text = kind != 0
    # A text token's place: after the slots, counted from the message's first text token.
    text_first = np.cumsum(n_text) - n_text
    text_idx = np.flatnonzero(text)
    text_rank = np.arange(text_idx.shape[0]) - text_first[msg[text_idx]]
    flat[row_start[msg[text_idx]] + slots + text_rank] = ids[text_idx]
    if p.bigrams and bi.shape[0]:
        bi_first = np.cumsum(n_bi) - n_bi
        bi_rank = np.arange(bi.shape[0]) - bi_first[bi_msg]
        flat[row_start[bi_msg] + slots + n_text[bi_msg] + bi_rank] = bi
    # Plain slices: np.split pays a swapaxes per row.
    bounds_list = np.append(row_start, flat.shape[0]).tolist()
    return [flat[a:b] for a, b in pairwise(bounds_list)]


_SEGMENT_SALTS: dict[int, npt.NDArray[np.uint64]] = {}


def _segment_salts(seed: int) -> npt.NDArray[np.uint64]:
    got = _SEGMENT_SALTS.get(seed)
    if got is None:
        got = np.array([s ^ seed for s in (_SALT_HDR, _SALT_SUBJ, _SALT_NAME, _SALT_BODY)], dtype=np.uint64)
        got.flags.writeable = False
        if len(_SEGMENT_SALTS) < 16:
            _SEGMENT_SALTS[seed] = got
    return got


def _hash_one(item: _Prepared, p: FeatureParams) -> IdArray:
    """`_hash_batch([item])[0]` in half the numpy calls: the per-message path
    (the service featurizes each message as it arrives), where numpy's per-call
    overhead, not the bytes, is the cost. One message's segments are known
    offsets, so no segment tables; body tokens come last, so the body cap is a slice.
    """
    hdr, text = item.hdr, item.text
    joined, starts, ends, lens = _token_spans(hdr, text)
    t0 = len(hdr) + 1
    c2, c3 = item.cuts
    f1, f2, f3 = (int(x) for x in np.searchsorted(starts, (t0, t0 + c2, t0 + c3)))
    end = min(starts.shape[0], f3 + p.max_body_tokens)
    starts, ends, lens = starts[:end], ends[:end], lens[:end]
    h = _span_hashes(joined, starts, ends, lens, len(hdr) if p.struct_digits else 0)
    # Each segment's salt on its tokens: structure [0, f1), subject, name, body [f3, end).
    h ^= np.repeat(_segment_salts(p.seed), (f1, f2 - f1, f3 - f2, end - f3))
    h = _mix(h)
    ids = _to_ids(h, p)
    slots = p.struct_slots
    n_struct = min(f1, slots)
    n_text = end - f1
    hb = h[f3:]
    if p.bigrams and hb.shape[0] > 1:
        bi = _to_ids(
            _mix(hb[:-1] * np.uint64(0x2545F4914F6CDD1D) + hb[1:] + np.uint64(_SALT_BI)), p
        )
    else:
        bi = ids[:0]
    out = np.zeros(slots + n_text + bi.shape[0], dtype=np.int64)
    out[:n_struct] = ids[:n_struct]
    out[slots : slots + n_text] = ids[f1:]
    out[slots + n_text :] = bi
    return out


# Bytes hashed in one numpy pass at most (the power tables cover this much).
_CHUNK_BYTES: Final = _TABLE_LEN - 1
# Bytes hashed per numpy pass in extract_many: small enough that the uint64
# prefix sums and per-token arrays stay in the CPU cache, large enough that the
# ~60 numpy calls per pass are spread over a few dozen messages.
_CHUNK_TARGET = 1 << 16


def _size(item: _Prepared) -> int:
    return len(item.hdr) + len(item.text) + 2


def _extract(raw: bytes, p: FeatureParams) -> IdArray:
    """`extract` without the safety net (tests call it to see the exception)."""
    return _hash_one(_prepare(raw, p), p)


def extract(raw: bytes, params: FeatureParams) -> IdArray:
    """Token ids (1-D int64) of one raw message. Never raises.

    Layout: `params.struct_slots` structure ids (0 = empty slot), then text
    ids, all in 1..buckets-1.
    """
    try:
        return _extract(bytes(raw), params)
    except Exception:
        # Unparseable beyond our guards: the model still gets a (known) token.
        return _hash_one(_ERROR, params)


def extract_many(raws: Iterable[bytes], params: FeatureParams) -> list[IdArray]:
    """`extract` for many messages at once (same ids), hashing them in shared
    numpy passes: the per-call numpy overhead is paid per chunk, not per message."""
    prepared: list[_Prepared] = []
    for raw in raws:
        try:
            item = _prepare(bytes(raw), params)
        except Exception:
            item = _ERROR
        if _size(item) >= _CHUNK_BYTES // 2:
            # Unreachable with the caps in _prepare (text <= 3 * text_max_bytes);
            # kept so one chunk always fits the power tables.
            q = _CHUNK_BYTES // 4
            c2, c3 = (min(c, q) for c in item.cuts)
            item = _Prepared(item.hdr[:q], item.text[:q], (c2, c3))
        prepared.append(item)
    out: list[IdArray] = []
    start, size = 0, 0
    for i, item in enumerate(prepared):
        if size + _size(item) > _CHUNK_TARGET and i > start:
            out.extend(_hash_chunk(prepared[start:i], params))
            start, size = i, 0
        size += _size(item)
    out.extend(_hash_chunk(prepared[start:], params))
    return out


# Chunks of at most this many messages are hashed one by one (_hash_one):
# _hash_batch's fixed cost (~60 numpy calls) pays off only from about four
# messages on (bench/results/cpu_profile.md). Under light load most batches
# hold one or two messages.
_ONE_BY_ONE: Final = 3


def _hash_chunk(items: Sequence[_Prepared], p: FeatureParams) -> list[IdArray]:
    if not items:
        return []
    if len(items) <= _ONE_BY_ONE:
        return [_hash_one_safe(it, p) for it in items]
    try:
        return _hash_batch(items, p)
    except Exception:
        return [extract_one_safe(it, p) for it in items]


def _hash_one_safe(item: _Prepared, p: FeatureParams) -> IdArray:
    try:
        return _hash_one(item, p)
    except Exception:
        return extract_one_safe(item, p)


def extract_one_safe(item: _Prepared, p: FeatureParams) -> IdArray:
    try:
        return _hash_batch([item], p)[0]
    except Exception:
        return _hash_batch([_ERROR], p)[0]


__all__ = [
    "FEATURE_VERSION",
    "MODERN_ONLY_TOKENS",
    "FeatureParams",
    "IdArray",
    "extract",
    "extract_many",
    "lure_tokens",
    "sender_signal_tokens",
    "structure_ids",
]
