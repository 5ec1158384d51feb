"""Calibration text → seeded token windows: `get_calib_windows(name_or_path, tokenizer, nsamples, seqlen, seed)`.

Hub datasets (need the `datasets` package and network, imported only here), built like upstream
LMDeploy/GPTQ (docs/formats.md §2), each with `random.Random(seed)`:
    wikitext2, ptb   train text joined, tokenized once, nsamples random (possibly overlapping) windows
    c4               a random document with at least seqlen tokens, a random window inside it; repeated
    pileval          shuffled lines of <= 512 tokens, nsamples of them concatenated and cut into
                     windows: far fewer than nsamples at seqlen 2048 (warned)

Local text (offline): a `.txt`/`.md` file, a `.jsonl` file (one JSON object a line with a `text`
field), an `.html`/`.htm` file (tags stripped, <script>/<style> dropped, entities unescaped), a
directory of such files (recursive, sorted, other files ignored) or a glob pattern (quote it).
Documents are tokenized (no special tokens) and concatenated with "\\n\\n" between them; the stream
is cut into non-overlapping windows of seqlen tokens from a seeded random offset and nsamples of
them are drawn without replacement (seeded). Fewer than nsamples windows available → a warning with
the numbers and all of them are used; not even one → an error with the numbers.
"""

from __future__ import annotations

import glob
import json
import random
import warnings
from html.parser import HTMLParser
from pathlib import Path

import torch

HUB_NAMES = ("c4", "ptb", "wikitext2", "pileval")
TEXT_SUFFIXES = (".txt", ".md", ".text")
HTML_SUFFIXES = (".html", ".htm")
JSONL_SUFFIXES = (".jsonl",)
LOCAL_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + JSONL_SUFFIXES
OFFLINE_HINT = (
    "pass a local text file, .jsonl, .html, directory or quoted glob instead, "
    "e.g. --calib-dataset /usr/share/debian-reference/"
)
PILEVAL_MAX_LINE_TOKENS = 512


class FewerWindows(UserWarning):
    """The text gives fewer windows than asked for (the run goes on with those); the CLI prints it as a note."""


class DatasetError(ValueError):
    """Calibration text cannot be found, read, or is too short; the message says what to pass instead."""


# ----------------------------------------------------------------------------------------------
# Local text


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page: <script>/<style> dropped, a newline after block elements."""

    BLOCKS = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "pre",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "dt",
        "dd",
        "table",
        "section",
        "title",
    }

    def __init__(self):
        super().__init__(convert_charrefs=True)  # &amp; &lt; &#8212; ... arrive unescaped in handle_data
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def read_documents(path: Path) -> list[str]:
    """The documents of one local file (a .jsonl file gives one per line)."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix in HTML_SUFFIXES:
        return [html_to_text(text)]
    if suffix in JSONL_SUFFIXES:
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DatasetError(f"{path}:{lineno}: each line must be a JSON object with a string 'text' field")
            docs.append(row["text"])
        return docs
    return [text]


def local_files(spec: str) -> list[Path]:
    """Files named by a file path, a directory (recursive, sorted) or a glob pattern."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        what = f"directory {path}"
    elif any(c in spec for c in "*?["):
        files = sorted(
            Path(p)
            for p in glob.glob(str(path), recursive=True)
            if Path(p).is_file() and Path(p).suffix.lower() in LOCAL_SUFFIXES
        )
        what = f"glob pattern {spec!r}"
    else:
        raise DatasetError(
            f"--calib-dataset {spec!r} is neither a hub dataset ({', '.join(HUB_NAMES)}) nor an "
            f"existing file, directory or glob pattern; " + OFFLINE_HINT
        )
    if not files:
        raise DatasetError(f"{what} holds no {', '.join(LOCAL_SUFFIXES)} files; " + OFFLINE_HINT)
    return files


def _tokenize_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """Documents joined by "\\n\\n" as one token stream (no BOS/EOS), LongTensor (N,)."""
    ids: list[int] = []
    for doc in docs:
        if doc.strip():
            ids += tokenizer(doc.strip() + "\n\n", add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _disjoint_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    rng = random.Random(seed)
    total = stream.numel()
    available = total // seqlen
    if available == 0:
        raise DatasetError(
            f"{source}: {total} tokens, fewer than one window of --calib-seqlen {seqlen}; "
            "pass more text or a smaller --calib-seqlen"
        )
    if available < nsamples:
        warnings.warn(
            f"{source}: {total} tokens give only {available} windows of {seqlen} tokens, "
            f"fewer than --calib-samples {nsamples}; using {available}",
            FewerWindows,
            stacklevel=3,
        )
    offset = rng.randint(0, total - available * seqlen)
    chunks = stream[offset : offset + available * seqlen].view(available, seqlen)  # (available, seqlen)
    picks = rng.sample(range(available), min(nsamples, available))
    return chunks[sorted(picks)].clone()


# ----------------------------------------------------------------------------------------------
# Hub datasets (upstream recipes)


def _load_hub(name: str, *args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"--calib-dataset {name} needs the `datasets` package, which is not installed "
            "(pip install datasets, and network access); or " + OFFLINE_HINT
        ) from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline/hub errors come in many types (ConnectionError, HfHubHTTPError, ...)
        raise DatasetError(
            f"--calib-dataset {name}: could not load {args[0]!r} from the hub "
            f"({type(e).__name__}: {e}); if offline, " + OFFLINE_HINT
        ) from e


def _random_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """Upstream wikitext2/ptb: nsamples random starts in the joined stream (windows may overlap)."""
    if stream.numel() <= seqlen:
        raise DatasetError(f"{source}: {stream.numel()} tokens, not more than --calib-seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def _hub_windows(name: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)

    if name == "wikitext2":
        data = _load_hub(name, "wikitext", "wikitext-2-raw-v1", split="train")
        return _random_windows(encode("\n\n".join(data["text"])), nsamples, seqlen, seed, name)
    if name == "ptb":
        data = _load_hub(name, "ptb_text_only", "penn_treebank", split="train")
        return _random_windows(encode(" ".join(data["sentence"])), nsamples, seqlen, seed, name)
    if name == "c4":
        data = _load_hub(name, "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        rng, windows = random.Random(seed), []
        for _ in range(nsamples):
            for _attempt in range(1000):  # documents shorter than a window are redrawn
                doc = encode(data[rng.randint(0, len(data) - 1)]["text"])
                if doc.numel() > seqlen:
                    break
            else:
                raise DatasetError(f"c4: no document of more than {seqlen} tokens in 1000 draws; lower --calib-seqlen")
            start = rng.randint(0, doc.numel() - seqlen - 1)
            windows.append(doc[start : start + seqlen])
        return torch.stack(windows)
    # pileval: short lines concatenated and re-split (upstream AWQ recipe)
    data = _load_hub(name, "mit-han-lab/pile-val-backup", split="validation").shuffle(seed=seed)
    lines: list[torch.Tensor] = []
    for row in data:
        ids = encode(row["text"].strip())
        if 0 < ids.numel() <= PILEVAL_MAX_LINE_TOKENS:
            lines.append(ids)
        if len(lines) == nsamples:
            break
    stream = torch.cat(lines) if lines else torch.empty(0, dtype=torch.long)
    available = stream.numel() // seqlen
    if available == 0:
        raise DatasetError(
            f"pileval: {nsamples} lines gave {stream.numel()} tokens, less than one window of "
            f"{seqlen}; raise --calib-samples or lower --calib-seqlen"
        )
    if available < nsamples:
        warnings.warn(
            f"pileval: {nsamples} lines of <= {PILEVAL_MAX_LINE_TOKENS} tokens ({stream.numel()} tokens) "
            f"give only {available} windows of {seqlen} tokens, fewer than --calib-samples {nsamples}",
            FewerWindows,
            stacklevel=3,
        )
    return stream[: available * seqlen].view(available, seqlen).clone()


def get_calib_windows(name_or_path: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Calibration windows, LongTensor (n, seqlen) with n <= nsamples; deterministic for a seed."""
    if nsamples <= 0 or seqlen <= 0:
        raise DatasetError(f"--calib-samples ({nsamples}) and --calib-seqlen ({seqlen}) must be positive")
    name = str(name_or_path)
    if name in HUB_NAMES and not Path(name).exists():
        return _hub_windows(name, tokenizer, nsamples, seqlen, seed)
    files = local_files(name)
    docs = [doc for f in files for doc in read_documents(f)]
    source = str(files[0]) if len(files) == 1 else f"{name} ({len(files)} files)"
    return _disjoint_windows(_tokenize_stream(docs, tokenizer), nsamples, seqlen, seed, source)
