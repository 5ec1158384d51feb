"""The TurboMind-style workspace: `config.ini` `[llama]` and the fp16 weight-file table.

This module owns the workspace format. `deploy` writes through it, `lite.kv_qparams` edits
config.ini through it, and the runtime reads through it; nothing else parses config.ini or
spells a weight-file name. Weights are read back either joined (`read_joined`: every TP rank in
one process) or one rank at a time (`read_rank`: a tensor-parallel process loads only its files).

Layout (docs/formats.md §1):
    workspace/triton_models/weights/config.ini        [llama] section, keys in upstream order
    workspace/triton_models/weights/<name>            raw little-endian fp16 (numpy .tofile), no header

Linear weights are stored (in, out); the QKV projection is fused per TP rank as
[Q_r | K_r | V_r] and the q/k output channels of every head are in TurboMind's interleaved
RoPE order [x0, x_{D/2}, x1, x_{D/2+1}, ...].

Loading (`read_joined`, what the runtime uses) refuses a workspace that would run wrongly but
silently: config.ini num_layer must match the layer files present, in both directions (fewer
would run a truncated model), and every weight must be finite (one pass over the fp16 bits,
~4 GB/s; a NaN or inf gave empty answers with exit code 0). deploy never writes non-finite
values (it refuses them in the checkpoint), so a failure here means a damaged or edited file.
"""

from __future__ import annotations

import configparser
import ctypes
import dataclasses
import mmap
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from runtime.atomic import staged_files
from runtime.quant import ONLINE_MODES, STORAGE_DTYPES

FORMAT_VERSION = 1
SECTION = "llama"
# The *_per_token_head modes (runtime.quant) need no parameter files; like FP8 they keep quant_policy 0.
KV_CACHE_DTYPES = (*STORAGE_DTYPES, *ONLINE_MODES)  # fp16 int8 fp8_e4m3 fp8_e5m2, then the online modes
KV_GRANULARITIES = ("tensor", "head")
# quant_policy is the 2023 TurboMind bitmask: 4 (kCacheKVInt8) = INT8 KV cache. (LMDeploy >= 0.4
# reused 4 for int4 and 8 for int8; this project keeps the 2023 meaning.) FP8 has no bit there:
# an FP8 workspace keeps quant_policy 0 and says fp8_* in kv_cache_dtype.
QUANT_POLICY_INT8 = 4


class WorkspaceError(ValueError):
    """A workspace file is missing, malformed or inconsistent; the message says how to fix it."""


@dataclass
class WorkspaceConfig:
    """The `[llama]` section of config.ini, typed. Field order is the on-disk key order."""

    model_name: str
    head_num: int
    kv_head_num: int
    size_per_head: int
    vocab_size: int
    num_layer: int
    rotary_embedding: int
    rope_theta: float
    inter_size: int
    norm_eps: float
    attn_bias: int
    start_id: int
    end_id: int
    weight_type: str = "fp16"
    group_size: int = 0
    max_batch_size: int = 32
    max_context_token_num: int = 4
    session_len: int = 2056
    step_length: int = 1
    cache_max_entry_count: float = 48
    cache_chunk_size: int = 1
    use_context_fmha: int = 1
    quant_policy: int = 0
    tensor_para_size: int = 1
    max_position_embeddings: int = 2048
    use_dynamic_ntk: int = 0
    use_logn_attn: int = 0
    # Keys of this project (absent upstream).
    kv_cache_dtype: str = "fp16"  # fp16 | int8 | fp8_e4m3 | fp8_e5m2 | *_per_token_head; int8 <=> quant_policy 4
    kv_granularity: str = "tensor"  # tensor (one scale per layer and TP rank) | head (one per KV head)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):  # coerce strings read from the ini into the declared types
            value = getattr(self, f.name)
            kind = {"int": int, "float": float, "str": str}[f.type]
            try:
                setattr(self, f.name, kind(value))
            except (TypeError, ValueError):
                raise WorkspaceError(f"config.ini [{SECTION}] {f.name} = {value!r} is not a valid {f.type}") from None
        self.validate()

    def validate(self) -> None:
        def bad(key: str, why: str) -> WorkspaceError:
            return WorkspaceError(f"config.ini [{SECTION}] {key} = {getattr(self, key)!r}: {why}")

        if self.format_version != FORMAT_VERSION:
            raise bad("format_version", f"this runtime reads format {FORMAT_VERSION}; re-run python -m deploy")
        for key in (
            "head_num",
            "kv_head_num",
            "size_per_head",
            "vocab_size",
            "num_layer",
            "inter_size",
            "session_len",
            "tensor_para_size",
            "max_batch_size",
        ):
            if getattr(self, key) <= 0:
                raise bad(key, "must be positive")
        if self.head_num % self.kv_head_num:
            raise bad("head_num", f"must be a multiple of kv_head_num ({self.kv_head_num})")
        if self.size_per_head % 2:
            raise bad("size_per_head", "RoPE needs an even head size")
        if self.rotary_embedding != self.size_per_head:
            raise bad("rotary_embedding", f"partial rotary is not supported; expected {self.size_per_head}")
        tp = self.tensor_para_size
        for key in ("head_num", "kv_head_num", "inter_size"):
            if getattr(self, key) % tp:
                raise bad(key, f"not divisible by tensor_para_size {tp}")
        if self.weight_type != "fp16":
            raise bad("weight_type", "only fp16 weights are supported")
        if self.attn_bias not in (0, 1) or self.use_context_fmha not in (0, 1):
            raise bad("attn_bias" if self.attn_bias not in (0, 1) else "use_context_fmha", "must be 0 or 1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}")
        if self.kv_granularity not in KV_GRANULARITIES:
            raise bad("kv_granularity", f"must be one of {', '.join(KV_GRANULARITIES)}")
        if (self.quant_policy & QUANT_POLICY_INT8 != 0) != (self.kv_cache_dtype == "int8"):
            raise bad(
                "quant_policy",
                f"disagrees with kv_cache_dtype = {self.kv_cache_dtype} "
                f"(quant_policy 4 <=> int8); re-run python -m lite.kv_qparams --update-config",
            )


def weights_dir(path: str | os.PathLike) -> Path:
    """Accept a workspace root, its triton_models/, or the weights directory itself."""
    path = Path(path)
    for candidate in (path / "triton_models" / "weights", path / "weights", path):
        if (candidate / "config.ini").is_file():
            return candidate
    raise WorkspaceError(
        f"no config.ini under {path} (looked in triton_models/weights/ and weights/); "
        "create a workspace with python -m deploy MODEL_NAME HF_PATH --dst-path DIR"
    )


def load_config(path: str | os.PathLike) -> WorkspaceConfig:
    """Read `[llama]` from config.ini (path: the file, a weights dir or a workspace root)."""
    path = Path(path)
    ini = path if path.is_file() else weights_dir(path) / "config.ini"
    parser = configparser.ConfigParser()
    try:
        parser.read(ini)
    except configparser.Error as e:
        raise WorkspaceError(f"{ini}: not a valid ini file ({e}); re-run python -m deploy") from None
    if not parser.has_section(SECTION):
        raise WorkspaceError(f"{ini}: no [{SECTION}] section; re-run python -m deploy")
    values = dict(parser[SECTION])
    if "format_version" not in values:
        raise WorkspaceError(
            f"{ini}: no format_version key (an upstream LMDeploy workspace?); "
            f"re-run python -m deploy to write format {FORMAT_VERSION}"
        )
    known = {f.name for f in fields(WorkspaceConfig)}
    required = {f.name for f in fields(WorkspaceConfig) if f.default is dataclasses.MISSING}
    missing = sorted(required - values.keys())
    if missing:
        raise WorkspaceError(f"{ini}: [{SECTION}] is missing {', '.join(missing)}; re-run python -m deploy")
    unknown = sorted(values.keys() - known)
    if unknown:
        raise WorkspaceError(
            f"{ini}: [{SECTION}] has unknown keys {', '.join(unknown)}; remove them or re-run python -m deploy"
        )
    try:
        return WorkspaceConfig(**values)
    except WorkspaceError as e:
        raise WorkspaceError(f"{ini}: {e}") from None


def save_config(cfg: WorkspaceConfig, path: str | os.PathLike) -> Path:
    """Write config.ini atomically (temp file + rename), keys in field order."""
    cfg.validate()
    path = Path(path)
    ini = path / "config.ini" if path.is_dir() else path
    parser = configparser.ConfigParser()
    parser[SECTION] = {f.name: _ini_value(getattr(cfg, f.name)) for f in fields(cfg)}
    with staged_files() as stage, open(stage(ini), "w") as fh:
        parser.write(fh)
    return ini


def _ini_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# Weight-file table. Shapes are per rank; `r` is the TP rank.


def ranked(name: str, rank: int) -> str:
    """`layers.0.attention.wo.weight` -> `layers.0.attention.wo.{rank}.weight` (rank before the extension)."""
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{rank}.{ext}"


def weight_table(cfg: WorkspaceConfig) -> dict[str, tuple[int, ...]]:
    """Every fp16 weight file the workspace must hold, name -> shape (per-rank shapes)."""
    tp, D = cfg.tensor_para_size, cfg.size_per_head
    model_dim = hidden_size(cfg)
    vocab = padded_vocab(cfg)
    table: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (vocab, model_dim),
        "norm.weight": (model_dim,),
        "output.weight": (vocab, model_dim),
    }
    qkv_r = (cfg.head_num + 2 * cfg.kv_head_num) * D // tp
    for i in range(cfg.num_layer):
        p = f"layers.{i}."
        table[p + "attention_norm.weight"] = (model_dim,)
        table[p + "ffn_norm.weight"] = (model_dim,)
        for r in range(tp):
            table[ranked(p + "attention.w_qkv.weight", r)] = (model_dim, qkv_r)
            table[ranked(p + "attention.wo.weight", r)] = (model_dim // tp, model_dim)
            if cfg.attn_bias:
                table[ranked(p + "attention.w_qkv.bias", r)] = (qkv_r,)
                table[ranked(p + "attention.wo.bias", r)] = (model_dim,)
            table[ranked(p + "feed_forward.w1.weight", r)] = (model_dim, cfg.inter_size // tp)
            table[ranked(p + "feed_forward.w3.weight", r)] = (model_dim, cfg.inter_size // tp)
            table[ranked(p + "feed_forward.w2.weight", r)] = (cfg.inter_size // tp, model_dim)
    return table


def hidden_size(cfg: WorkspaceConfig) -> int:
    """The model (residual) width. TurboMind assumes head_num * size_per_head = hidden size."""
    return cfg.head_num * cfg.size_per_head


def padded_vocab(cfg: WorkspaceConfig) -> int:
    """Embedding/output rows: vocab_size rounded up to a multiple of tp (zero rows); config keeps the real size."""
    tp = cfg.tensor_para_size
    return (cfg.vocab_size + tp - 1) // tp * tp


LAYER_FILE = re.compile(r"layers\.(\d+)\.(?:attention|attention_norm|ffn_norm|feed_forward)\.")
FINITE_CHUNK = 1 << 22  # elements per pass of the non-finite check (bounds its temporaries to a few MiB)


def check_layer_files(wdir: str | os.PathLike, cfg: WorkspaceConfig) -> None:
    """config.ini num_layer against the layers that have weight files, both ways (KV parameter files aside)."""
    wdir = Path(wdir)
    layers = {int(m.group(1)) for f in os.listdir(wdir) if (m := LAYER_FILE.match(f)) and not f.endswith(".tmp")}
    ini = wdir / "config.ini"
    extra = sorted(i for i in layers if i >= cfg.num_layer)
    if extra:
        raise WorkspaceError(
            f"{ini}: num_layer = {cfg.num_layer}, but {wdir} holds weight files for {max(layers) + 1} layers "
            f"(layers.{extra[0]}.* to layers.{extra[-1]}.* would be ignored, running a truncated model); "
            f"set num_layer = {max(layers) + 1} or re-run python -m deploy"
        )
    missing = [i for i in range(cfg.num_layer) if i not in layers]
    if missing:
        first = f"layers.{missing[0]}.*" + (f" to layers.{missing[-1]}.*" if len(missing) > 1 else "")
        raise WorkspaceError(
            f"{ini}: num_layer = {cfg.num_layer}, but {wdir} has no weight files for {len(missing)} of those layers "
            f"({first}); set num_layer = {len(layers)} if the model has {len(layers)} layers, or re-run python -m deploy"
        )


def check_finite(path: Path, w: np.ndarray) -> None:
    """Refuse an fp16 array holding inf or NaN (exponent bits all ones), in one pass over its bits."""
    bits = w.reshape(-1).view(np.uint16)
    bad, first = 0, None
    for lo in range(0, bits.size, FINITE_CHUNK):
        hits = np.flatnonzero((bits[lo : lo + FINITE_CHUNK] & 0x7C00) == 0x7C00)
        if hits.size and first is None:
            first = lo + int(hits[0])
        bad += hits.size
    if bad:
        raise WorkspaceError(
            f"weight file {path} holds {bad} non-finite values (inf/nan; the first at flat index {first}, value "
            f"{float(w.reshape(-1)[first])}); the file is damaged: re-run python -m deploy"
        )


def read_weight(wdir: str | os.PathLike, name: str, shape: tuple[int, ...], *, finite: bool = False) -> np.ndarray:
    """Memory-map one fp16 weight file, checking its size against `shape` first (and, with finite=True,
    that it holds no inf/NaN)."""
    path = Path(wdir) / name
    expected = int(np.prod(shape)) * 2
    if not path.is_file():
        raise WorkspaceError(
            f"missing weight file {path} (expected {expected} bytes, shape {shape}); re-run python -m deploy"
        )
    actual = path.stat().st_size
    if actual != expected:
        raise WorkspaceError(
            f"weight file {path} has {actual} bytes, expected {expected} (fp16 {shape}); re-run python -m deploy"
        )
    w = np.memmap(path, dtype="<f2", mode="r", shape=shape)
    if finite:
        check_finite(path, w)
        release_pages(w)
    return w


def release_pages(w: np.ndarray) -> None:
    """Unmap the pages this process has read of a weight `read_weight` mapped (the file's data stays in the page
    cache; a later read maps it again), so that a load which reads every file once holds about one file's pages
    at a time instead of the whole model's on top of its own copy. No-op for an array that is not a read-only
    map (a writable or copy-on-write map would lose the changes made through it)."""
    owner, base = w, w
    while isinstance(base, np.ndarray):
        owner, base = base, base.base
    # read_weight's maps are read-only and shared (mode "r"): dropping their pages loses nothing
    if isinstance(base, mmap.mmap) and not owner.flags.writeable and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def release_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim). A load's large temporary copies
    raise glibc's mmap threshold as they are freed, so later ones come from the heap and stay resident after
    they are freed (~30 MB after an engine's load, ~145 MB when it also loaded transformers' tokenizer).
    Nothing to do where the C library has no malloc_trim (musl, macOS)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the C library this process runs on
    if trim is not None:
        trim(0)


def check_weights(wdir: str | os.PathLike, cfg: WorkspaceConfig) -> None:
    """Fail on the first missing or wrongly sized weight file."""
    for name, shape in weight_table(cfg).items():
        read_weight(wdir, name, shape)


def split_qkv_rank(w: np.ndarray, cfg: WorkspaceConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split one rank's fused [Q_r | K_r | V_r] along the last axis (weight (in, out) or bias (out,))."""
    tp, D = cfg.tensor_para_size, cfg.size_per_head
    q = cfg.head_num * D // tp
    k = cfg.kv_head_num * D // tp
    return w[..., :q], w[..., q : q + k], w[..., q + k :]


def read_joined(wdir: str | os.PathLike, cfg: WorkspaceConfig) -> dict[str, np.ndarray]:
    """All weights with TP ranks joined back into single-rank tensors (workspace layout otherwise).

    Keys are the rank-free names (`layers.{i}.attention.w_qkv.weight`, ...). The fused QKV comes
    back as [Q | K | V] over all heads (RoPE-interleaved q/k channels, as stored); vocab padding is
    dropped. Arrays are fp16; rank-free files stay memory-mapped. The layer count and finiteness are
    checked first (see the module docstring).
    """
    check_layer_files(wdir, cfg)
    table = weight_table(cfg)
    tp = cfg.tensor_para_size
    out: dict[str, np.ndarray] = {}
    for name in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        w = read_weight(wdir, name, table[name], finite=True)
        out[name] = w[: cfg.vocab_size] if w.ndim == 2 else w
    for i in range(cfg.num_layer):
        p = f"layers.{i}."
        for name in ("attention_norm.weight", "ffn_norm.weight"):
            out[p + name] = read_weight(wdir, p + name, table[p + name], finite=True)
        fused = ["attention.w_qkv.weight"] + (["attention.w_qkv.bias"] if cfg.attn_bias else [])
        for name in fused:
            parts = [
                split_qkv_rank(read_weight(wdir, ranked(p + name, r), table[ranked(p + name, r)], finite=True), cfg)
                for r in range(tp)
            ]
            out[p + name] = np.concatenate(
                [np.concatenate([part[j] for part in parts], axis=-1) for j in range(3)], axis=-1
            )
        for name, axis in (
            ("attention.wo.weight", 0),
            ("feed_forward.w1.weight", 1),
            ("feed_forward.w3.weight", 1),
            ("feed_forward.w2.weight", 0),
        ):
            ws = [read_weight(wdir, ranked(p + name, r), table[ranked(p + name, r)], finite=True) for r in range(tp)]
            out[p + name] = ws[0] if tp == 1 else np.concatenate(ws, axis=axis)
        if cfg.attn_bias:  # wo bias is copied to every rank; rank 0 holds it
            name = ranked(p + "attention.wo.bias", 0)
            out[p + "attention.wo.bias"] = read_weight(wdir, name, table[name], finite=True)
    return out


def read_rank(wdir: str | os.PathLike, cfg: WorkspaceConfig, rank: int) -> dict[str, np.ndarray]:
    """One TP rank's weights, for a process that runs only that rank (runtime.distributed); rank-free keys.

    The rank's own files as stored: the fused QKV of its heads [Q_r | K_r | V_r] (head_num / tp query heads,
    kv_head_num / tp KV heads), the wo rows and w2 rows of its heads / FFN columns, the w1 / w3 columns; the
    wo bias (a full copy on every rank, added after the all-reduce). Norms are replicated. tok_embeddings and
    output are split by vocabulary rows: rank r holds rows [r V_p / tp, (r + 1) V_p / tp) of the padded table
    (V_p = padded_vocab; the padding rows are zero and sit on the last rank). Arrays stay memory-mapped fp16.
    """
    tp = cfg.tensor_para_size
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside tensor_para_size {tp} (ranks 0..{tp - 1})")
    table = weight_table(cfg)
    rows = padded_vocab(cfg) // tp
    out: dict[str, np.ndarray] = {"norm.weight": read_weight(wdir, "norm.weight", table["norm.weight"])}
    for name in ("tok_embeddings.weight", "output.weight"):
        out[name] = read_weight(wdir, name, table[name])[rank * rows : (rank + 1) * rows]
    for i in range(cfg.num_layer):
        p = f"layers.{i}."
        for name in ("attention_norm.weight", "ffn_norm.weight"):
            out[p + name] = read_weight(wdir, p + name, table[p + name])
        names = ["attention.w_qkv.weight", "attention.wo.weight"]
        names += ["feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight"]
        names += ["attention.w_qkv.bias", "attention.wo.bias"] if cfg.attn_bias else []
        for name in names:
            out[p + name] = read_weight(wdir, ranked(p + name, rank), table[ranked(p + name, rank)])
    return out


def kv_bytes_per_token(cfg: WorkspaceConfig, row_bytes: float) -> float:
    """K and V of every layer for one token: 2 * num_layer * kv_head_num * row_bytes, where a row (one KV head)
    is size_per_head * bytes per element, plus 4 bytes of (scale, zero) in the online modes
    (`runtime.quant.kv_row_bytes`)."""
    return 2 * cfg.num_layer * cfg.kv_head_num * row_bytes


def replace(cfg: WorkspaceConfig, **changes) -> WorkspaceConfig:
    """A validated copy with some keys changed."""
    return dataclasses.replace(cfg, **changes)
