"""`triaged feedback` as a real process: stdin in, exit statuses out
(sysexits, read by Dovecot's pipe and MTAs), and the Maildir++ harvest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from classifier.learning.store import FeedbackStore

ROOT = Path(__file__).resolve().parent.parent


def feedback(
    *args: str, stdin: bytes = b"", cwd: Path = ROOT
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "feedback", *args],
        input=stdin, capture_output=True, cwd=cwd, env=env, timeout=120,
    )  # fmt: skip


MSG = (
    b"X-Triage-Category: promotions\r\nX-Triage-Spam: no\r\n"
    b"From: Shop <news@shop.example>\r\nSubject: sale\r\nMessage-ID: <s1@shop.example>\r\n"
    b"\r\nBig sale today.\r\n"
)


def test_records_a_correction(tmp_path: Path) -> None:
    r = feedback("--label", "primary", "--user", "alice", "--store", str(tmp_path), stdin=MSG)
    assert r.returncode == 0, r.stderr
    [item] = FeedbackStore(tmp_path).items()
    assert (item.label, item.user, item.kind, item.decided) == (
        "primary",
        "alice",
        "correction",
        "promotions",
    )
    assert item.raw == MSG
    r = feedback("--label", "primary", "--store", str(tmp_path), stdin=MSG)
    assert r.returncode == 0 and b"already recorded" in r.stdout and not r.stderr
    r = feedback("--label", "spam", "--store", str(tmp_path), stdin=MSG)
    assert r.returncode == 0
    assert [i.label for i in FeedbackStore(tmp_path).items()] == ["spam"]


def test_bad_input_is_dataerr(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    for stdin, why in [
        (b"", b"empty input"),
        (b"just some text\nwith lines\n", b"no header block"),
        (b"\r\nbody only\r\n", b"no header block"),
        (b"Subject: no sender\r\n\r\nbody\r\n", b"no From"),
        (b"\x00\x01\x02binary", b"no header block"),
    ]:
        r = feedback("--label", "primary", "--store", store, stdin=stdin)
        assert r.returncode == 65, (stdin, r.stderr)
        assert why in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    r = feedback("--label", "nosuchlabel", "--store", store, stdin=MSG)
    assert r.returncode == 65 and b"unknown label 'nosuchlabel'" in r.stderr
    assert b"Traceback" not in r.stderr
    r = feedback("--store", store, stdin=MSG)
    assert r.returncode == 65 and b"--label" in r.stderr
    assert not (tmp_path / "s" / "feedback.log").exists()


def test_store_failure_is_tempfail(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = feedback("--label", "primary", "--store", str(blocker / "store"), stdin=MSG)
    assert r.returncode == 75, r.stderr
    assert r.stderr.startswith(b"triaged feedback: store:") and b"Traceback" not in r.stderr


def test_config_gives_store_and_limits(tmp_path: Path) -> None:
    conf = tmp_path / "t.toml"
    conf.write_text(
        f'[learning]\nstore_path = "{tmp_path / "fromconf"}"\nmax_items = 10\n'
        f'[classifier]\nmodel_path = "{ROOT / "models/default.onnx"}"\n'
    )
    r = feedback("--config", str(conf), "--label", "updates", stdin=MSG, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(FeedbackStore(tmp_path / "fromconf").items()) == 1
    conf.write_text("[learning]\nmax_itemz = 3\n")
    r = feedback("--config", str(conf), "--label", "updates", stdin=MSG)
    assert r.returncode == 78 and b"max_itemz" in r.stderr


def _maildir(root: Path, folder: str, messages: list[bytes]) -> None:
    d = root if folder == "INBOX" else root / f".{folder}"
    for sub in ("cur", "new", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for n, raw in enumerate(messages):
        (d / ("cur" if n % 2 else "new") / f"{n}.host:2,S").write_bytes(raw)


def _m(n: int, cat: str) -> bytes:
    return (
        f"X-Triage-Category: {cat}\nFrom: x{n}@example.org\nSubject: s{n}\n"
        f"Message-ID: <h{n}@example.org>\n\nbody {n}\n"
    ).encode()


def test_maildir_harvest(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    _maildir(md, "INBOX", [_m(1, "primary"), _m(2, "promotions")])
    _maildir(md, "Junk", [_m(3, "primary"), b"not a message at all"])
    _maildir(md, "Work.Lists", [_m(4, "forums")])
    store = tmp_path / "store"
    args = ["--from-maildir", str(md), "--store", str(store), "--user", "bob"]
    maps = ["--map", "INBOX=primary", "--map", "Junk=spam", "--map", "Work.Lists=forums"]
    r = feedback(*args, *maps)
    assert r.returncode == 0, r.stderr
    assert b"recorded 4, already there 0, not mail 1" in r.stdout
    got = {(i.message_id, i.label, i.kind) for i in FeedbackStore(store).items()}
    assert got == {
        ("<h1@example.org>", "primary", "confirmation"),
        ("<h2@example.org>", "primary", "correction"),
        ("<h3@example.org>", "spam", "correction"),
        ("<h4@example.org>", "forums", "confirmation"),
    }
    r = feedback(*args, *maps)  # harvesting again adds nothing
    assert r.returncode == 0 and b"recorded 0, already there 4" in r.stdout
    r = feedback(*args, "--map", "Nope=spam")
    assert r.returncode == 66 and b"Nope" in r.stderr
    r = feedback(*args, "--map", "INBOX=bogus")
    assert r.returncode == 65 and b"unknown label" in r.stderr
    r = feedback(*args, "--map", "INBOX")
    assert r.returncode == 65 and b"FOLDER=LABEL" in r.stderr
