"""Labels for the default model: SpamAssassin weak labels refined in code, Enron, modern sets.

Every refinement is a named rule; `audit()` counts what each rule changed,
for the model card. Leaks of how the corpora were collected are stripped
from the bytes before anything sees them (`strip_leaks`).

Layout expected (see ../shared/data/README.md):
  SA_DIR/<group>/<id>.txt                     SpamAssassin, raw
  DATA_DIR/spamassassin-weak-labels.json.gz   weak labels
  UNPACKED/enron_with_categories/<1-8>/N.txt  and the modern sets, each unpacked
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

from classifier.corpus import Message, iter_path
from classifier.features import (
    FeatureParams,
    _domain,
    _first,
    _org,
    _parse_headers,
    _split_head,
)

CATEGORIES = ["forums", "primary", "promotions", "updates"]
SA_SPAM_GROUPS = ("spam-1", "spam-2")
_P = FeatureParams()

# --- leaks -------------------------------------------------------------------
# Header fields that only say how a corpus was collected (README "Leaks to strip").
_LEAK_FIELDS = re.compile(
    rb"(?mi)^(x-keywords|x-status|x-folder|x-origin|x-filename|x-from|x-to|x-cc|x-bcc|"
    rb"delivery-date|x-eudora2unix|x-spam-[a-z-]+)[ \t]*:.*(\r?\n[ \t].*)*\r?\n"
)
# Received lines of the SpamAssassin collector (taint.org, fetchmail).
_LEAK_RECEIVED = re.compile(
    rb"(?mi)^received:(?:.*(?:\r?\n[ \t].*)*)(?:taint\.org|fetchmail)(?:.*(?:\r?\n[ \t].*)*)\r?\n"
)
# The anonymised recipients, wherever they appear (some spam quotes the recipient).
_LEAK_ADDR = re.compile(rb"(?i)\b(zzzz|yyyy)(?=[@.])")
_LEAK_DOMAIN = re.compile(rb"(?i)(?:spamassassin\.)?taint\.org")


def strip_leaks(raw: bytes) -> bytes:
    head, sep, body = raw.partition(b"\n\n")
    head = _LEAK_RECEIVED.sub(b"", _LEAK_FIELDS.sub(b"", head + b"\n"))[:-1]
    return _LEAK_DOMAIN.sub(b"example.com", _LEAK_ADDR.sub(b"user", head + sep + body))


# --- SpamAssassin weak-label refinement -----------------------------------------

_LIST_FIELDS = ("list-id", "list-post", "mailing-list", "x-mailing-list", "x-beenthere")


def refine_sa(group: str, raw: bytes, weak: str) -> tuple[str | None, bool, str]:
    """(category or None, spam, rule) for one SpamAssassin message."""
    if group in SA_SPAM_GROUPS:
        return None, True, "spam-group"
    h = _parse_headers(_split_head(raw, _P)[0], _P)
    has_list = any(k in h for k in _LIST_FIELDS)
    subject = _first(h, "subject").strip().lower()
    if weak == "promotions/newsletter":
        if "list-post" in h:  # two-way list with an unsubscribe: a discussion list
            return "forums", False, "promotions-with-list-post->forums"
        return "promotions", False, "promotions"
    if weak == "forums" and not has_list:
        # Forum only by its "[tag]" subject: a reply copied straight to the user
        # (person-to-person or forum: unknown), or a bulk digest.
        prec = _first(h, "precedence").lower()
        if subject.startswith(("re:", "aw:")) or "re: [" in subject:
            return None, False, "tag-only-reply->unknown"
        if prec in ("bulk", "list", "junk"):
            return "forums", False, "tag-only-bulk->forums"
        return None, False, "tag-only->unknown"
    if weak == "primary" and has_list:
        return "forums", False, "primary-with-list-headers->forums"
    if weak == "primary" and not (
        subject.startswith(("re:", "fwd:", "fw:")) or "in-reply-to" in h or "references" in h
    ):
        # "Nothing matched" is mostly newsletters the weak rules missed; only
        # replies are surely person to person. Enron supplies primary mail.
        return None, False, "primary-not-a-reply->unknown"
    if weak == "updates" and has_list and _first(h, "auto-submitted") == "":
        name, local, _ = _domain(_first(h, "from"))
        if not re.search(
            r"(rss|noreply|no-reply|root|cron|daemon|bounce|errata)", local + name.lower()
        ):
            return "forums", False, "updates-on-list-by-person->forums"
    return weak, False, "kept"


def load_spamassassin(
    sa_dir: Path, weak_labels: Path
) -> tuple[list[Message], Counter[tuple[str, str, str]]]:
    weak = json.loads(gzip.decompress(weak_labels.read_bytes()))
    out: list[Message] = []
    audit: Counter[tuple[str, str, str]] = Counter()
    for key in sorted(weak):
        group = key.split("/", 1)[0]
        path = sa_dir / key
        if not path.is_file():
            continue
        raw = strip_leaks(path.read_bytes())
        cat, spam, rule = refine_sa(group, raw, weak[key])
        audit[(weak[key], str(cat if not spam else "spam"), rule)] += 1
        out.append(
            Message(raw=raw, category=cat, spam=spam, source=f"sa/{group}", ident=key, group=key)
        )
    return out, audit


# --- Enron (primary) -------------------------------------------------------------


_X_FROM = re.compile(rb"(?mi)^x-from:[ \t]*([^<\r\n]*)")
_FROM_BARE = re.compile(rb"(?mi)^from:[ \t]*([^\s<>\"]+@[^\s<>\"]+)[ \t]*(\r?\n)")


def restore_display_name(raw: bytes) -> bytes:
    """`From: Name <addr>` for an Enron message whose export moved the name to X-From.

    The Enron export wrote the bare address in From and the display name in
    X-From (stripped as a leak). Left so, no person-to-person training message
    has a display name, while every personal message today has one: the model
    learned "a From with a name is not primary" from how the corpus was exported.
    """
    head, sep, body = raw.partition(b"\n\n")
    name = _X_FROM.search(head)
    bare = _FROM_BARE.search(head)
    if name is None or bare is None:
        return raw
    text = name.group(1).strip().strip(b'"').replace(b'"', b"")
    if not text or b"@" in text or b"/" in text:
        return raw
    line = b'From: "' + text + b'" <' + bare.group(1) + b">" + bare.group(2)
    return head[: bare.start()] + line + head[bare.end() :] + sep + body


def load_enron(root: Path) -> tuple[list[Message], Counter[tuple[str, str, str]]]:
    """Folders 1-8 are person-to-person business mail: primary. Messages the
    annotators marked as newsletters (2.10) have no sure category: spam head only."""
    out: list[Message] = []
    audit: Counter[tuple[str, str, str]] = Counter()
    for path in sorted(root.glob("[1-8]/*.txt"), key=lambda p: (p.parent.name, int(p.stem))):
        cats_file = path.with_suffix(".cats")
        cats = cats_file.read_text(errors="replace") if cats_file.exists() else ""
        newsletter = any(line.startswith("2,10,") for line in cats.splitlines())
        cat = None if newsletter else "primary"
        audit[("enron", str(cat), "newsletter->unknown" if newsletter else "primary")] += 1
        raw = strip_leaks(restore_display_name(path.read_bytes()))
        sender = _domain(_first(_parse_headers(_split_head(raw, _P)[0], _P), "from"))
        out.append(
            Message(
                raw=raw,
                category=cat,
                spam=False,
                source="enron",
                ident=f"enron/{path.parent.name}/{path.name}",
                # The sender: all of Enron is one domain, so the person is the
                # group a sender-held-out split keeps whole.
                group="enron/" + (sender[1] or path.name),
            )
        )
    return out, audit


# --- modern sets --------------------------------------------------------------------

MODERN_SETS = {
    # folder: (category, spam, source, trainable)
    "forums-public-lists-2019-2026": ("forums", False, "modern/forums", True),
    "updates-bounces-sisimai": ("updates", False, "modern/bounces", True),
    "promotions-newsletters-unspy-2023": ("promotions", False, "modern/newsletters", True),
    "spam-glitchyzorua-2023-2025": (None, True, "modern/spam-glitchyzorua", True),
    # MIT; hand-labelled by its packager: updates/ (carrier and shop
    # notifications) and primary/ (two people forwarding one): the subfolder wins.
    "modern-transactional-mailandpackages": ("updates", False, "modern/shipping", True),
    # CC BY-NC 4.0: evaluation only, never trained on.
    "spam-phishing-pot-sample": (None, True, "modern/phishing-pot", False),
}


def _modern_group(folder: str, ident: str, raw: bytes) -> str:
    """Sender or list key: templates repeat within it, so splits keep it whole."""
    name = Path(ident.split("#", 1)[0]).name
    if folder.startswith("forums"):
        return name  # the list (one mbox per list)
    if folder.startswith("updates"):
        return re.sub(r"-\d+\.eml$", "", name)  # the reporting MTA family
    if folder.startswith("promotions"):
        return re.sub(r"^\d{4}-\d\d-\d\d-|[.-]u\d\.eml$|\.eml$", "", name)
    h = _parse_headers(_split_head(raw, _P)[0], _P)
    dom = _domain(_first(h, "from"))[2]
    return (_org(dom) if dom else "") or name


# Spam posted to the modern public lists and kept by their archives (scams,
# warez "downloads", lead sellers): mbox file -> message indexes. Found by hand
# audit: new-thread posts without the lists' topic words, and the posts the
# model scored most spam-like, each read and judged. They are spam, not forum
# mail: they train and test as spam.
LIST_SPAM: dict[str, frozenset[int]] = {
    "linux-oxnas.groups.io.0.mbox": frozenset({205, 207, 208, 209, 210, 211, 212, 213, 214, 215}),
    "open-iscsi.googlegroups.com.0.mbox": frozenset(
        {117, 119, 120, 121, 123, 124, 125, 126, 128, 129, 130, 131, 132, 133, 134, 135,
         138, 139, 140, 141, 142, 143, 237, 387}
    ),
}  # fmt: skip


def is_list_spam(ident: str) -> bool:
    name, _, index = Path(ident).name.partition("#")
    return index.isdigit() and int(index) in LIST_SPAM.get(name, frozenset())


def load_modern(root: Path) -> list[Message]:
    out: list[Message] = []
    for folder, (cat, spam, source, _trainable) in MODERN_SETS.items():
        base = root / folder
        if not base.is_dir():
            continue
        for ident, raw in iter_path(base):
            list_spam = folder.startswith("forums") and is_list_spam(ident)
            sub = Path(ident[len(str(base)) + 1 :]).parts[0]
            label = sub if sub in CATEGORIES else cat  # a labelled subfolder wins
            out.append(
                Message(
                    raw=raw,
                    category=None if list_spam else label,
                    spam=spam or list_spam,
                    source=source,
                    ident=ident[len(str(root)) + 1 :],
                    group=_modern_group(folder, ident, raw),
                )
            )
    return out


def format_audit(audit: Counter[tuple[str, str, str]]) -> str:
    lines = ["| weak label | final | rule | messages |", "|---|---|---|---|"]
    for (weak, final, rule), n in sorted(audit.items()):
        lines.append(f"| {weak} | {final} | {rule} | {n} |")
    return "\n".join(lines)


__all__ = [
    "CATEGORIES",
    "MODERN_SETS",
    "format_audit",
    "load_enron",
    "load_modern",
    "load_spamassassin",
    "refine_sa",
    "restore_display_name",
    "strip_leaks",
]
