"""The engine's tokenizer (runtime/tokenizer.py): HF's AutoTokenizer on the first start, its backend tokenizer from
the cache on later ones, with the same tokens and text as HF's; anything else still from HF."""

from __future__ import annotations

import glob
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import tokenizer as rt_tokenizer
from runtime.tokenizer import CachedTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tok_dir(tmp_path, demo_model) -> Path:
    """A copy of the demo model's tokenizer files (what deploy puts in a workspace's tokenizer directory)."""
    d = tmp_path / "tokenizer"
    d.mkdir()
    for f in demo_model.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("KVQ_TOKENIZER_CACHE", str(d))
    return d


def texts() -> list[str]:
    """Real English (Debian's documentation where installed), chat markup, and odd spacing and scripts."""
    out = [rt_tokenizer.PROBE, "<|im_start|>user\nWhat is Debian?<|im_end|>\n<|im_start|>assistant\n", "", " ", "\n\n"]
    for f in sorted(glob.glob("/usr/share/doc/debian/FAQ/*.html"))[:3]:
        out.append(Path(f).read_text(errors="replace")[:30000])
    return out


def test_first_start_caches_hf_backend_and_later_ones_match_hf(tok_dir, cache):
    hf = load_tokenizer(tok_dir)  # first start: HF's tokenizer, and the cache entry
    assert not isinstance(hf, CachedTokenizer) and type(hf).__module__.startswith("transformers")
    assert len(list(cache.glob("*.json"))) == 1
    cached = load_tokenizer(tok_dir)
    assert isinstance(cached, CachedTokenizer)
    for text in texts():
        for special in (False, True):
            ids = hf.encode(text, add_special_tokens=special)
            assert cached.encode(text, add_special_tokens=special) == ids
            for skip in (False, True):
                assert cached.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)  # any id sequence, special tokens and partial UTF-8 included, decodes as HF's
    vocab = len(hf)
    for _ in range(200):
        ids = [rng.randrange(vocab) if rng.random() < 0.9 else rng.randrange(17) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert cached.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    import torch

    assert cached.decode(torch.tensor(ids)) == hf.decode(ids)
    assert len(cached) == len(hf)


def test_cached_start_does_not_import_transformers(tok_dir, cache):
    load_tokenizer(tok_dir)
    code = (
        "import sys; from runtime.tokenizer import load_tokenizer, CachedTokenizer; "
        f"t = load_tokenizer({str(tok_dir)!r}); assert isinstance(t, CachedTokenizer), t; "
        "assert t.decode(t.encode('Hello there')) == 'Hello there'; "
        "assert 'transformers' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_everything_else_comes_from_hf(tok_dir, cache):
    hf = load_tokenizer(tok_dir)
    cached = load_tokenizer(tok_dir)
    assert cached.eos_token == hf.eos_token and cached.eos_token_id == hf.eos_token_id
    assert cached("Hello there", add_special_tokens=False)["input_ids"] == hf.encode(
        "Hello there", add_special_tokens=False
    )
    msgs = [{"role": "user", "content": "Hi"}]
    assert cached.apply_chat_template(msgs, tokenize=False) == hf.apply_chat_template(msgs, tokenize=False)
    assert cached.encode("Hello there", add_special_tokens=False, max_length=1, truncation=True) == hf.encode(
        "Hello there", add_special_tokens=False, max_length=1, truncation=True
    )


def test_changed_tokenizer_files_are_not_served_from_the_cache(tok_dir, cache):
    load_tokenizer(tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["added_tokens"].append(
        {"id": len(load_tokenizer(tok_dir)), "content": "<|mine|>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
    )  # fmt: skip
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec))
    hf = load_tokenizer(tok_dir)  # new contents: HF again, and a second entry
    assert not isinstance(hf, CachedTokenizer) and len(list(cache.glob("*.json"))) == 2
    cached = load_tokenizer(tok_dir)
    assert cached.encode("a<|mine|>b", add_special_tokens=False) == hf.encode("a<|mine|>b", add_special_tokens=False)
    assert len(cached.encode("a<|mine|>b", add_special_tokens=False)) == 3


def test_broken_cache_entry_is_rebuilt(tok_dir, cache):
    load_tokenizer(tok_dir)
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json")
    tok = load_tokenizer(tok_dir)  # HF, and a good entry again
    assert not isinstance(tok, CachedTokenizer)
    assert isinstance(load_tokenizer(tok_dir), CachedTokenizer)


def test_unwritable_cache_leaves_hf(tok_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KVQ_TOKENIZER_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    for _ in range(2):
        tok = load_tokenizer(tok_dir)
        assert not isinstance(tok, CachedTokenizer)
        assert tok.decode(tok.encode("Hello there", add_special_tokens=False)) == "Hello there"


def test_tokenizer_whose_decode_differs_from_its_backend_is_not_cached(tmp_path, cache):
    """A WordPiece tokenizer whose HF decode cleans up spaces before punctuation: HF's text is not the backend's, so
    it is never cached; the same files without the clean-up are."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        ["Hello world , this is a test . ok ?"] * 10, trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"])
    )
    for clean, cached in ((True, False), (False, True)):
        d = tmp_path / f"wp-{clean}"
        PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=clean
        ).save_pretrained(d)
        hf = load_tokenizer(d)
        assert "," in hf.decode(hf.encode("world , this", add_special_tokens=False))
        assert isinstance(load_tokenizer(d), CachedTokenizer) is cached


def test_tokenizer_without_tokenizer_json_is_hf(tmp_path, cache, monkeypatch):
    """No tokenizer.json (a slow SentencePiece or tiktoken tokenizer): HF's tokenizer every time, nothing cached."""
    d = tmp_path / "sentencepiece"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"not read here")
    hf = object()
    monkeypatch.setattr(rt_tokenizer, "_hf_tokenizer", lambda path: hf if path == d else None)
    assert load_tokenizer(d) is hf and load_tokenizer(d) is hf
    assert not cache.exists()
