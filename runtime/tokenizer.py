"""The engine's tokenizer: HF's, with its backend tokenizer cached so later starts skip importing transformers.

Importing transformers and building an AutoTokenizer takes ~4 s of a CPU engine's ~5 s start on a 2-core machine
(the model load is ~1.3 s of it), and ~130 MB of resident memory, while the engine itself only encodes prompts and
decodes tokens. For a fast (`tokenizers`-backed) HF tokenizer both are its backend tokenizer's: `encode` and
`decode` call `backend_tokenizer.encode / decode`, HF adding nothing where it would not clean up spaces after
decoding. So the first start with a tokenizer loads it through HF as before and saves that backend tokenizer,
exactly as HF built it (its class-specific rebuilds, added special tokens, post-processor), to
`~/.cache/kvq/tokenizers` (or $KVQ_TOKENIZER_CACHE), keyed by the tokenizer files' contents and the transformers and
tokenizers versions; it is saved only after it encoded and decoded a probe text (every added token, spaces, tabs,
newlines, accents, CJK, an emoji) exactly as HF did. Later starts load the saved file with `tokenizers` alone
(~0.1 s). Anything else asked of the tokenizer (calling it, `apply_chat_template`, special-token attributes) goes to
the HF tokenizer, loaded on first use.

HF is used every time where the cache cannot apply: a tokenizer without a `tokenizers` backend (slow
SentencePiece / tiktoken ones), one whose decode cleans up spaces, a probe mismatch, or an unwritable cache
directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

PROBE = (
    " Hello,  world!\tDon't stop\n\nthe  café — naïve façade; 日本語のテキスト 🙂 x=1+2 (ok?) ... 'quoted' "
    '"double" end \n  trailing  '
)


def cache_dir() -> Path:
    return Path(os.environ.get("KVQ_TOKENIZER_CACHE", Path.home() / ".cache" / "kvq" / "tokenizers"))


def load_tokenizer(tok_dir: Path):
    """The tokenizer of a workspace's tokenizer directory: a `CachedTokenizer` where a cached backend tokenizer for
    these files exists (or can be made now), else HF's AutoTokenizer."""
    tok_dir = Path(tok_dir)
    key = _cache_key(tok_dir)
    path = cache_dir() / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            return CachedTokenizer(tok_dir, path)
        except Exception:  # noqa: BLE001 - an unreadable cache entry is rebuilt below from HF's tokenizer
            pass
    hf = _hf_tokenizer(tok_dir)
    if path is not None:
        _save_backend(hf, path)
    return hf


class CachedTokenizer:
    """A fast HF tokenizer's backend (`tokenizers.Tokenizer`) loaded from the cache: `encode` / `decode` as HF's;
    every other attribute, and calling it, from the HF tokenizer, loaded on first use."""

    def __init__(self, tok_dir: Path, path: Path) -> None:
        import tokenizers

        entry = json.loads(path.read_text(encoding="utf-8"))
        self._backend = tokenizers.Tokenizer.from_str(entry["backend"])
        self._backend.encode_special_tokens = bool(entry["encode_special_tokens"])
        self._dir = tok_dir

    def encode(self, text, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if kwargs or not isinstance(text, str):  # pairs, truncation, tensors...: HF's
            return self.hf.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if kwargs:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # tensors, arrays
        return self._backend.decode(
            [ids] if isinstance(ids, int) else list(ids), skip_special_tokens=skip_special_tokens
        )

    @functools.cached_property
    def hf(self):
        """The HF tokenizer of the same files (imports transformers: ~4 s the first time)."""
        return _hf_tokenizer(self._dir)

    def __len__(self) -> int:  # HF's: the vocabulary with the added tokens
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, *args, **kwargs):
        return self.hf(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_backend", "_dir"):  # not set yet (copy, pickle): no HF load
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __repr__(self) -> str:
        return f"CachedTokenizer({str(self._dir)!r})"


def _hf_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _cache_key(tok_dir: Path) -> str | None:
    """sha256 of the tokenizer files (names and contents) and the transformers / tokenizers versions; None where
    there is no tokenizer.json (no fast tokenizer to cache) or a version cannot be read."""
    if not (tok_dir / "tokenizer.json").is_file():
        return None
    try:
        versions = f"transformers {metadata.version('transformers')} tokenizers {metadata.version('tokenizers')}"
    except metadata.PackageNotFoundError:
        return None
    h = hashlib.sha256(versions.encode())
    for f in sorted(p for p in tok_dir.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def _save_backend(hf, path: Path) -> bool:
    """Save hf's backend tokenizer at path if it stands for hf (see the module docstring); True if saved."""
    import tokenizers

    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        return False
    entry = {"backend": backend.to_str(), "encode_special_tokens": bool(backend.encode_special_tokens)}
    try:
        copy = tokenizers.Tokenizer.from_str(entry["backend"])
        copy.encode_special_tokens = entry["encode_special_tokens"]
        added = [t.content for t in backend.get_added_tokens_decoder().values()]
        text = PROBE + " ".join(f"a{t}b {t}" for t in added)
        for special in (False, True):
            ids = hf.encode(text, add_special_tokens=special)
            if copy.encode(text, add_special_tokens=special).ids != ids:
                return False
            if copy.decode(ids, skip_special_tokens=special) != hf.decode(ids, skip_special_tokens=special):
                return False  # e.g. HF cleans up spaces after decoding
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(entry), encoding="utf-8")
            os.replace(tmp, path)  # atomic: concurrent starts race harmlessly
        finally:
            tmp.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - no cache (read-only home, odd tokenizer): HF's tokenizer is used as before
        return False
    return True
