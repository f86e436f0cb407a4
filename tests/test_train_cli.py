"""End to end through the real CLI: a generated folder tree with three custom
categories and spam -> `triaged train` -> `triaged evaluate` -> `triaged classify`."""

from __future__ import annotations

import json
import mailbox
import random
from pathlib import Path

import pytest

from classifier.corpus import load_dir, split_mbox
from classifier.model import load_model
from proxy.__main__ import main

WORDS = {
    "invoices": "invoice payment due amount total remittance account receivable vat net".split(),
    "builds": "build failed pipeline commit branch test job runner artifact log".split(),
    "family": "dinner mum weekend kids birthday grandma visit love photos holiday".split(),
    "spam": "winner prize claim free money viagra urgent bank transfer lottery".split(),
}
SENDERS = {
    "invoices": ("Billing <billing@acme.example>", "Invoice {n}"),
    "builds": ("CI <ci@builds.example>", "[ci] pipeline #{n} finished"),
    "family": ("Mum <mum@home.example>", "Re: plans for the weekend {n}"),
    "spam": ("WINNER <x{n}@prize.example>", "YOU WON ${n}!!!"),
}


def _message(kind: str, n: int, rng: random.Random) -> bytes:
    sender, subject = SENDERS[kind]
    body = " ".join(rng.choice(WORDS[kind] + WORDS["family"][:2]) for _ in range(40))
    extra = "List-Id: <ci.builds.example>\n" if kind == "builds" else ""
    return (
        f"From: {sender.format(n=n)}\nTo: me@example.org\nSubject: {subject.format(n=n)}\n"
        f"Message-ID: <{kind}{n}@example>\n{extra}\n{body}\n"
    ).encode()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """invoices: .eml files; builds: a Maildir; family: an mbox; spam: .eml files."""
    rng = random.Random(5)
    root = tmp_path_factory.mktemp("data")
    for kind in WORDS:
        folder = root / kind
        folder.mkdir()
        msgs = [_message(kind, n, rng) for n in range(60)]
        if kind == "builds":
            md = mailbox.Maildir(str(folder / "INBOX"))
            for m in msgs:
                md.add(m)
        elif kind == "family":
            mb = mailbox.mbox(str(folder / "family.mbox"))
            for m in msgs:
                mb.add(m)
            mb.flush()
        else:
            for n, m in enumerate(msgs):
                (folder / f"{n}.eml").write_bytes(m)
    return root


def test_corpus_reads_all_three_layouts(tree: Path) -> None:
    msgs = load_dir(tree)
    by = {}
    for m in msgs:
        by[m.source] = by.get(m.source, 0) + 1
    assert by == {"builds": 60, "family": 60, "invoices": 60, "spam": 60}
    assert all(m.category is None and m.spam for m in msgs if m.source == "spam")
    assert split_mbox(b"From a\nSubject: x\n\n>From here\nFrom b\nSubject: y\n\nz\n") == [
        b"Subject: x\n\nFrom here\n",
        b"Subject: y\n\nz\n",
    ]


def test_train_evaluate_classify(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "site.onnx"
    args = ["train", str(tree), "--out", str(out), "--epochs", "8", "--buckets", "4096", "--quiet"]
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "validation" in report and "macro-F1" in report
    assert out.exists() and (tmp_path / "site-int8.onnx").exists()

    # Deterministic for a seed: the same bytes of weights again.
    again = tmp_path / "again.onnx"
    assert main([*args[:3], str(again), *args[4:], "--no-int8"]) == 0
    capsys.readouterr()
    import onnx

    def weights(p: Path) -> list[bytes]:
        return [t.raw_data for t in onnx.load_model(str(p)).graph.initializer]

    assert weights(out) == weights(again)

    model = load_model(str(out))
    assert model.manifest.labels == ["builds", "family", "invoices"]
    assert model.manifest.training["spam"] > 0

    assert main(["evaluate", str(out), str(tree), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 240 and result["n_spam"] == 60
    assert result["macro_f1"] >= 0.95
    assert result["spam_recall"] >= 0.95 and result["spam_fp_rate"] <= 0.05
    assert result["messages_per_s"] > 0

    assert main(["evaluate", str(out), str(tree)]) == 0
    text = capsys.readouterr().out
    assert "confusion" in text and "spam: precision" in text

    rng = random.Random(99)
    probe = tmp_path / "probe"
    probe.mkdir()
    expected = {}
    for kind in ("invoices", "builds", "family", "spam"):
        (probe / f"{kind}.eml").write_bytes(_message(kind, 1000, rng))
        expected[f"{kind}.eml"] = kind
    assert main(["classify", str(out), str(probe), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4
    for row in lines:
        kind = expected[Path(row["message"]).name]
        if kind == "spam":
            assert row["spam"] is True
        else:
            assert row["category"] == kind and row["spam"] is False
        assert row["model"] == "site/1"

    assert main(["classify", str(out), str(probe / "family.eml")]) == 0
    assert capsys.readouterr().out.startswith("family.eml\tfamily\t")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    assert main(["classify", str(bad), str(bad)]) == 2
    assert "not a usable ONNX model" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx"), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err


async def test_retrained_model_served_by_the_proxy(tree: Path, tmp_path: Path) -> None:
    """The site-training path end to end: their folders -> `triaged train` ->
    `triaged evaluate` -> `triaged serve`'s Server stamps their categories and
    the spam verdict on mail relayed over real sockets."""
    import msgspec
    from conftest import CaptureServer, SmtpTestClient, base_settings

    from proxy.server import Server

    model = tmp_path / "site.onnx"
    assert main(["train", str(tree), "--out", str(model), "--epochs", "8", "--buckets", "4096",
                 "--quiet", "--no-int8"]) == 0
    assert main(["evaluate", str(model), str(tree), "--json"]) == 0

    capture = CaptureServer()
    await capture.start()
    settings = base_settings(capture.url)
    classifier = msgspec.structs.replace(
        settings.classifier, kind="onnx", model_path=str(model), provider="cpu",
        rule_overrides=False, timeout_ms=30_000.0,
    )
    srv = Server(msgspec.structs.replace(settings, classifier=classifier))
    await srv.start()
    try:
        rng = random.Random(123)
        kinds = ("invoices", "builds", "family", "spam")
        client = await SmtpTestClient.connect(*srv.addresses[0])
        assert (await client.reply())[0] == 220
        assert (await client.cmd("EHLO client.test"))[0] == 250
        for n, kind in enumerate(kinds):
            raw = _message(kind, 2000 + n, rng).replace(b"\n", b"\r\n")
            assert (await client.send_message("a@example.org", ["b@example.net"], raw))[0] == 250
        await client.close()
    finally:
        await srv.stop(drain_timeout_s=1.0)
        await capture.stop()

    assert len(capture.messages) == len(kinds)
    for kind, got in zip(kinds, capture.messages, strict=True):
        head = got.data.split(b"\r\n\r\n", 1)[0].decode()
        assert "X-Triage-Model: site/1" in head
        if kind == "spam":
            assert "X-Triage-Spam: yes" in head
        else:
            assert f"X-Triage-Category: {kind}" in head
            assert "X-Triage-Spam: no" in head
