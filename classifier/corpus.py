"""Read mail folders: Maildir, mbox files, single .eml files, one folder per category.

`triaged train DATA_DIR` expects DATA_DIR/<category>/... with any mix of the
three; a folder named `spam` (configurable) holds spam, which trains the spam
head only (its category is unknown).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import msgspec

# Files in a mail folder that are not mail.
_SKIP_SUFFIXES = (".json", ".cats", ".md", ".gz", ".tgz", ".zip", ".py", ".sh", ".csv", ".tsv")
_SKIP_NAMES = ("license", "readme", "copying", "categories.txt", "manifest")
_MAX_FILE_BYTES = 256 * 1024 * 1024
# mbox "From " separator line (mboxo/mboxrd): at line start, after a blank line or at offset 0.
_MBOX_SEP = re.compile(rb"(?m)^From [^\n]*\n")
_MBOXRD_QUOTE = re.compile(rb"(?m)^>(>*From )")


class Message(msgspec.Struct, frozen=True):
    """One labelled message. `category` None: unknown (spam, or ham of no category)."""

    raw: bytes
    category: str | None
    spam: bool
    source: str  # where it came from, for reports ("easy-ham-1", "modern-forums", ...)
    ident: str  # path (and index inside an mbox)
    group: str = ""  # sender/list key for group splits

    @property
    def digest(self) -> bytes:
        return hashlib.md5(self.raw, usedforsecurity=False).digest()


def split_mbox(data: bytes) -> list[bytes]:
    """Messages of an mbox file, "From " lines removed and >From unquoted."""
    out = []
    for chunk in _MBOX_SEP.split(data):
        if chunk.strip():
            out.append(_MBOXRD_QUOTE.sub(rb"\1", chunk))
    return out


def _is_mail_file(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
        return False
    return not name.startswith(_SKIP_NAMES)


def iter_path(path: Path) -> Iterator[tuple[str, bytes]]:
    """(ident, raw) for every message under `path`, in a stable (sorted) order."""
    if path.is_file():
        if not _is_mail_file(path) or path.stat().st_size > _MAX_FILE_BYTES:
            return
        data = path.read_bytes()
        if data.startswith(b"From "):
            for i, raw in enumerate(split_mbox(data)):
                yield f"{path}#{i}", raw
        elif data.strip():
            yield str(path), data
        return
    if not path.is_dir():
        return
    # A Maildir's messages are its cur/ and new/ (tmp/ holds partial deliveries).
    if (path / "cur").is_dir() or (path / "new").is_dir():
        for sub in ("cur", "new"):
            if (path / sub).is_dir():
                for entry in sorted(os.listdir(path / sub)):
                    yield from iter_path(path / sub / entry)
        return
    for entry in sorted(os.listdir(path)):
        yield from iter_path(path / entry)


def load_dir(data_dir: str | Path, *, spam_folder: str = "spam") -> list[Message]:
    """Every message of DATA_DIR/<category>/..., labelled by its top folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    out: list[Message] = []
    for entry in sorted(os.listdir(root)):
        folder = root / entry
        if entry.startswith(".") or not folder.is_dir():
            continue
        is_spam = entry == spam_folder
        for ident, raw in iter_path(folder):
            out.append(
                Message(
                    raw=raw,
                    category=None if is_spam else entry,
                    spam=is_spam,
                    source=entry,
                    ident=ident,
                    group=ident,
                )
            )
    return out


def iter_inputs(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    """Messages named on a command line: files, mboxes, Maildirs, folders."""
    for p in paths:
        yield from iter_path(Path(p))


__all__ = ["Message", "iter_inputs", "iter_path", "load_dir", "split_mbox"]
