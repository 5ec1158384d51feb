"""Calibration statistics of K and V: the only reader and writer of `key_stats.pth` / `value_stats.pth`.

On disk (docs/formats.md §2, the upstream LMDeploy layout, kept in fp32 instead of fp16):

    work_dir/key_stats.pth, work_dir/value_stats.pth   (torch.save)
        {'max': {layer: T}, 'min': {layer: T}, 'absmax': {layer: T}}
        layer = 'model.layers.{i}' in layer order; T = fp32 tensor (kv_heads, head_dim)
    work_dir/calib_summary.json   model, dataset, samples, seqlen, seed, tokens

K is observed after RoPE and V as produced, exactly as they enter the cache, per (kv_head, channel)
and before any GQA repeat. Channels are in the HF order: each K head is [first half | second half]
(the rotate_half layout), NOT TurboMind's interleaved order. Per-tensor and per-head parameters
reduce over channels, so the order does not change them; a per-channel consumer must permute.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runtime.atomic import staged_files

KEY_FILE, VALUE_FILE, SUMMARY_FILE = "key_stats.pth", "value_stats.pth", "calib_summary.json"
STAT_NAMES = ("max", "min", "absmax")
FIX = "re-run python -m lite.calibrate --model HF_PATH --calib-dataset DATA --work-dir {work_dir}"


class StatsError(ValueError):
    """A stats file is missing or malformed; the message names the file and the fix."""


def layer_name(i: int) -> str:
    return f"model.layers.{i}"


@dataclass
class Stats:
    """Running statistics of one of K or V over all layers: each tensor (num_layer, kv_heads, head_dim), fp32."""

    max: torch.Tensor
    min: torch.Tensor
    absmax: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.max.shape)


@dataclass
class KVStats:
    key: Stats
    value: Stats
    layer_names: list[str]

    @property
    def num_layer(self) -> int:
        return self.key.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def head_dim(self) -> int:
        return self.key.shape[2]


@dataclass
class CalibSummary:
    model: str
    dataset: str
    samples: int  # windows actually used (may be fewer than asked, see lite.datasets)
    seqlen: int
    seed: int
    tokens: int


class StatsAccumulator:
    """Running per-(layer, kv_head, channel) max / min / absmax of K and V, kept in fp32.

    `update(layer_idx, k, v)` takes one layer's states of shape (B, H_kv, T, D) in any float dtype;
    the reductions run in that dtype (exact: a max of fp16 values is an fp16 value) and are
    folded into the fp32 running tensors, so nothing of the batch is kept.
    """

    def __init__(self, num_layer: int, kv_heads: int, head_dim: int):
        shape = (num_layer, kv_heads, head_dim)
        self.num_layer = num_layer
        self._k = Stats(*self._empty(shape))
        self._v = Stats(*self._empty(shape))
        self.tokens_seen = torch.zeros(num_layer, dtype=torch.long)  # per layer, to check every layer was fed

    @staticmethod
    def _empty(shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.full(shape, -torch.inf), torch.full(shape, torch.inf), torch.zeros(shape))

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for x, st in ((k, self._k), (v, self._v)):
            if x.ndim != 4 or tuple(x.shape[i] for i in (1, 3)) != st.shape[1:]:
                raise ValueError(
                    f"layer {layer_idx}: expected K/V of shape (B, {st.shape[1]}, T, {st.shape[2]}), "
                    f"got {tuple(x.shape)}"
                )
            x = x.detach()
            mx = x.amax(dim=(0, 2)).to(device="cpu", dtype=torch.float32)  # (H_kv, D)
            mn = x.amin(dim=(0, 2)).to(device="cpu", dtype=torch.float32)
            torch.maximum(st.max[layer_idx], mx, out=st.max[layer_idx])
            torch.minimum(st.min[layer_idx], mn, out=st.min[layer_idx])
            # absmax = max(|max|, |min|): exact, and avoids materialising |x|
            torch.maximum(st.absmax[layer_idx], torch.maximum(mx.abs(), mn.abs()), out=st.absmax[layer_idx])
        self.tokens_seen[layer_idx] += k.shape[0] * k.shape[2]

    def result(self) -> KVStats:
        unseen = [i for i in range(self.num_layer) if self.tokens_seen[i] == 0]
        if unseen:
            raise RuntimeError(f"no K/V was observed for layers {unseen}; the model did not call the capture cache")
        clone = lambda s: Stats(s.max.clone(), s.min.clone(), s.absmax.clone())  # noqa: E731
        return KVStats(clone(self._k), clone(self._v), [layer_name(i) for i in range(self.num_layer)])


def _to_dict(s: Stats, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {stat: {n: getattr(s, stat)[i].clone() for i, n in enumerate(names)} for stat in STAT_NAMES}


def save(work_dir: str | os.PathLike, stats: KVStats, summary: CalibSummary | None = None) -> list[Path]:
    """Write key/value stats (+ summary) atomically: temp files first, renamed only when all are written."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with staged_files() as stage:
        for fname, s in ((KEY_FILE, stats.key), (VALUE_FILE, stats.value)):
            torch.save(_to_dict(s, stats.layer_names), stage(work_dir / fname))
        if summary is not None:
            stage(work_dir / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    names = (KEY_FILE, VALUE_FILE) + ((SUMMARY_FILE,) if summary is not None else ())
    return [work_dir / n for n in names]


def _load_one(path: Path, fix: str) -> tuple[Stats, list[str]]:
    if not path.is_file():
        raise StatsError(f"{path} is missing; {fix}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; report them all the same way
        raise StatsError(f"{path} is not a readable stats file ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(raw, dict) or set(raw) != set(STAT_NAMES):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise StatsError(f"{path}: expected a dict with keys {list(STAT_NAMES)}, got {got}; {fix}")
    names = list(raw["max"]) if isinstance(raw["max"], dict) else []
    if not names:
        raise StatsError(f"{path}: no layers; {fix}")
    first = raw["max"][names[0]] if isinstance(raw["max"], dict) else None
    if not isinstance(first, torch.Tensor) or first.ndim != 2:
        raise StatsError(f"{path}: ['max']['{names[0]}'] must be a tensor (kv_heads, head_dim); {fix}")
    tensors = {}
    for stat in STAT_NAMES:
        if not isinstance(raw[stat], dict) or list(raw[stat]) != names:
            raise StatsError(
                f"{path}: '{stat}' must hold the same layers in the same order as 'max' ({names[:3]}...); " + fix
            )
        for n, t in raw[stat].items():
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape != first.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise StatsError(
                    f"{path}: ['{stat}']['{n}'] has shape {shape}, expected (kv_heads, head_dim) "
                    f"= {tuple(first.shape)}; {fix}"
                )
            if not torch.isfinite(t).all():
                raise StatsError(f"{path}: ['{stat}']['{n}'] has non-finite values; {fix}")
        tensors[stat] = torch.stack([raw[stat][n].to(torch.float32) for n in names])  # (L, H_kv, D)
    bad = (tensors["min"] > tensors["max"]).nonzero()
    if len(bad):
        i, h, c = bad[0].tolist()
        raise StatsError(f"{path}: layer {names[i]} head {h} channel {c} has min > max; {fix}")
    return Stats(tensors["max"], tensors["min"], tensors["absmax"]), names


def load(work_dir: str | os.PathLike) -> KVStats:
    """Read and validate key/value stats from work_dir (keys, layer order, shapes, finiteness)."""
    work_dir = Path(work_dir)
    fix = FIX.format(work_dir=work_dir)
    key, names = _load_one(work_dir / KEY_FILE, fix)
    value, vnames = _load_one(work_dir / VALUE_FILE, fix)
    if vnames != names or value.shape != key.shape:
        raise StatsError(
            f"{work_dir}: {KEY_FILE} ({len(names)} layers, {key.shape[1:]}) and {VALUE_FILE} "
            f"({len(vnames)} layers, {value.shape[1:]}) do not match; {fix}"
        )
    return KVStats(key, value, names)


def load_summary(work_dir: str | os.PathLike) -> CalibSummary | None:
    path = Path(work_dir) / SUMMARY_FILE
    return CalibSummary(**json.loads(path.read_text())) if path.is_file() else None
