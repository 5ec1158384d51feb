"""lite.datasets: local text formats, seeded windows, hub names without `datasets` or network."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from lite import datasets as ds


@pytest.fixture(scope="module")
def tok(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


PAGE = """<html><head><title>T</title><style>body { color: red }</style>
<script>var secret = "do not keep";</script></head>
<body><h1>Heading &amp; more</h1><p>First &lt;para&gt; with&nbsp;entities &#8212; done.</p>
<ul><li>item one</li><li>item two</li></ul></body></html>"""


def test_html_to_text():
    text = ds.html_to_text(PAGE)
    assert "secret" not in text and "color" not in text and "<" not in text.replace("<para>", "")
    assert "Heading & more" in text
    assert "First <para> with entities \u2014 done." in text  # &nbsp; -> \xa0, collapsed like other whitespace
    assert text.splitlines()[-2:] == ["item one", "item two"]


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def stream_of(docs, tok) -> list[int]:
    """Independent reference: each document + blank line, tokenized without special tokens, concatenated."""
    out: list[int] = []
    for d in docs:
        out += tok(d.strip() + "\n\n", add_special_tokens=False)["input_ids"]
    return out


def is_slice(window: list[int], stream: list[int]) -> bool:
    n = len(window)
    return any(stream[i : i + n] == window for i in range(len(stream) - n + 1))


def test_txt_windows_are_disjoint_slices_and_seeded(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text(words(400, "alpha"))
    w = ds.get_calib_windows(str(f), tok, 4, 64, seed=0)
    assert w.shape == (4, 64) and w.dtype == torch.long
    stream = stream_of([f.read_text()], tok)
    assert all(is_slice(row.tolist(), stream) for row in w)
    starts = sorted(next(i for i in range(len(stream)) if stream[i : i + 64] == row.tolist()) for row in w)
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:], strict=False))  # non-overlapping
    assert torch.equal(w, ds.get_calib_windows(str(f), tok, 4, 64, seed=0))
    assert not torch.equal(w, ds.get_calib_windows(str(f), tok, 4, 64, seed=1))


def test_jsonl_html_dir_and_glob(tmp_path, tok):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": words(60, t), "id": 1}) for t in ("jx", "jy")))
    (tmp_path / "sub" / "c.html").write_text(PAGE.replace("item one", words(80, "hx")))
    (tmp_path / "a.txt").write_text(words(60, "tx"))
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01 binary")
    docs = [
        words(60, "tx"),
        words(60, "jx"),
        words(60, "jy"),
        ds.html_to_text(PAGE.replace("item one", words(80, "hx"))),
    ]
    stream = stream_of(docs, tok)  # sorted order: a.txt, b.jsonl, sub/c.html
    n = len(stream) // 32
    w = ds.get_calib_windows(str(tmp_path), tok, n, 32, seed=3)
    assert w.shape == (n, 32) and all(is_slice(row.tolist(), stream) for row in w)
    text = tok.decode(w.flatten())
    assert "secret" not in text and "<li>" not in text
    g = ds.get_calib_windows(str(tmp_path / "*.jsonl"), tok, 2, 16, seed=0)
    assert all(is_slice(row.tolist(), stream_of(docs[1:3], tok)) for row in g)
    assert ds.local_files(str(tmp_path / "**" / "*.html")) == [tmp_path / "sub" / "c.html"]


def test_debian_reference_glob(tok):
    files = ds.local_files("/usr/share/debian-reference/ch0[1-5]*.html")
    assert [f.name for f in files] == [f"ch0{i}.en.html" for i in range(1, 6)]
    w = ds.get_calib_windows("/usr/share/debian-reference/ch03.en.html", tok, 3, 128)
    assert w.shape == (3, 128) and "<div" not in tok.decode(w[0])


def test_bad_local_inputs(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(ds.DatasetError, match=r"bad.jsonl:2: each line must be a JSON object with a string 'text'"):
        ds.get_calib_windows(str(tmp_path / "bad.jsonl"), tok, 1, 8)
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(ds.DatasetError, match=r"unsupported file type '.bin'"):
        ds.get_calib_windows(str(tmp_path / "x.bin"), tok, 1, 8)
    with pytest.raises(ds.DatasetError, match=r"neither a hub dataset .* nor an existing file.*debian-reference"):
        ds.get_calib_windows(str(tmp_path / "nope.txt"), tok, 1, 8)
    with pytest.raises(ds.DatasetError, match=r"holds no .txt"):
        ds.get_calib_windows(str(tmp_path / "*.zzz"), tok, 1, 8)
    with pytest.raises(ds.DatasetError, match=r"must be positive"):
        ds.get_calib_windows(str(tmp_path / "bad.jsonl"), tok, 0, 8)


def test_too_little_text(tmp_path, tok):
    f = tmp_path / "short.txt"
    f.write_text(words(30, "w"))
    total = len(stream_of([f.read_text()], tok))
    with pytest.raises(
        ds.DatasetError, match=rf"short.txt: {total} tokens, fewer than one window of --calib-seqlen 4096"
    ):
        ds.get_calib_windows(str(f), tok, 2, 4096)
    with pytest.warns(
        UserWarning,
        match=rf"{total} tokens give only {total // 20} windows of 20 tokens, fewer than "
        rf"--calib-samples 1000; using {total // 20}",
    ):
        w = ds.get_calib_windows(str(f), tok, 1000, 20)
    assert w.shape == (total // 20, 20)


def test_hub_name_without_datasets_package(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not
    with pytest.raises(
        ds.DatasetError, match=r"needs the `datasets` package.*--calib-dataset /usr/share/debian-reference/"
    ):
        ds.get_calib_windows("c4", tok, 2, 16)


class FakeRows(list):
    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self]
        return super().__getitem__(key)

    def shuffle(self, seed):
        import random

        rows = FakeRows(self)
        random.Random(seed).shuffle(rows)
        return rows


def fake_datasets(monkeypatch, rows=None, error=None):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if error:
            raise error
        return FakeRows(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_offline_error(monkeypatch, tok):
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'wikitext' on the Hub"))
    with pytest.raises(
        ds.DatasetError,
        match=r"wikitext2: could not load 'wikitext' .*ConnectionError.*if offline, "
        r"pass a local",
    ):
        ds.get_calib_windows("wikitext2", tok, 2, 16)


def test_hub_wikitext2_upstream_windows(monkeypatch, tok):
    rows = [{"text": words(50, t)} for t in ("a", "b", "c")]
    calls = fake_datasets(monkeypatch, rows)
    w = ds.get_calib_windows("wikitext2", tok, 5, 16, seed=0)
    assert calls[0][0] == ("wikitext", "wikitext-2-raw-v1") and calls[0][1]["split"] == "train"
    stream = tok("\n\n".join(r["text"] for r in rows), add_special_tokens=False)["input_ids"]
    assert w.shape == (5, 16) and all(is_slice(row.tolist(), stream) for row in w)
    assert torch.equal(w, ds.get_calib_windows("wikitext2", tok, 5, 16, seed=0))


def test_hub_pileval_warns_fewer_windows(monkeypatch, tok):
    rows = [{"text": words(10, f"l{i}_")} for i in range(8)] + [{"text": words(600, "long")}]
    fake_datasets(monkeypatch, rows)
    with pytest.warns(
        UserWarning,
        match=r"pileval: 9 lines .* give only \d+ windows of 64 tokens, fewer than "
        r"--calib-samples 9",
    ):
        w = ds.get_calib_windows("pileval", tok, 9, 64, seed=0)
    assert w.shape[1] == 64 and 1 <= w.shape[0] < 9
    assert "long" not in tok.decode(w.flatten())  # lines over 512 tokens are skipped
