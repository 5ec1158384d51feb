"""KV quantization parameter files in the workspace: the only reader and writer.

Every file is raw little-endian float32 of shape (4, n), row-major, rows
[k_scale, k_zp, v_scale, v_zp]; n = 1 for per-tensor (one value for the layer's heads on that TP
rank) or n = kv_head_num / tp for per-head. FP8 files have zero zp rows. File names, per layer i
and TP rank r:

    int8      tensor  layers.{i}.past_kv_scale.{r}.weight            16 bytes (= upstream LMDeploy)
    int8      head    layers.{i}.past_kv_scale_head.{r}.weight       16 * n bytes
    fp8_e4m3  tensor  layers.{i}.past_kv_scale_fp8_e4m3.{r}.weight
    fp8_e4m3  head    layers.{i}.past_kv_scale_fp8_e4m3_head.{r}.weight
    fp8_e5m2  ...     (same pattern)

Upstream never validated these files (a short file crashed or silently became scale 1, zp 0);
here every load checks presence, size, finiteness and positive scales, and names the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.atomic import staged_files
from runtime.workspace import WorkspaceConfig, WorkspaceError

QUANTIZED_DTYPES = ("int8", "fp8_e4m3", "fp8_e5m2")
FIX = "re-run python -m lite.kv_qparams --work-dir WORK_DIR --turbomind-dir {wdir}{flags}"


class KVParamsError(WorkspaceError):
    """A KV parameter file is missing or malformed."""


@dataclass
class KVParams:
    """Per-layer KV parameters expanded to one value per KV head: each tensor (num_layer, kv_head_num), fp32
    (kv_head_num / tp columns when read for one tensor-parallel rank)."""

    kv_dtype: str
    granularity: str
    k_scale: torch.Tensor
    k_zp: torch.Tensor
    v_scale: torch.Tensor
    v_zp: torch.Tensor

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_scale, k_zp, v_scale, v_zp) for layer i, each (kv_head_num,)."""
        return self.k_scale[i], self.k_zp[i], self.v_scale[i], self.v_zp[i]


def file_name(layer: int, rank: int, kv_dtype: str, granularity: str) -> str:
    if kv_dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype!r} has no parameter file; expected one of {QUANTIZED_DTYPES}")
    suffix = ("" if kv_dtype == "int8" else "_" + kv_dtype) + ("_head" if granularity == "head" else "")
    return f"layers.{layer}.past_kv_scale{suffix}.{rank}.weight"


def values_per_rank(cfg: WorkspaceConfig, granularity: str) -> int:
    return 1 if granularity == "tensor" else cfg.kv_head_num // cfg.tensor_para_size


def _fix(wdir: Path, kv_dtype: str, granularity: str) -> str:
    flags = "" if kv_dtype == "int8" else f" --kv-dtype {kv_dtype}"
    flags += " --granularity head" if granularity == "head" else ""
    return FIX.format(wdir=wdir, flags=flags)


def write(wdir: str | os.PathLike, cfg: WorkspaceConfig, params: KVParams) -> list[Path]:
    """Write every layer/rank file for `params` (tensor granularity needs equal values within a rank).

    All files are first written as *.tmp and renamed only after all succeeded, so an error leaves
    the previous parameters intact.
    """
    wdir = Path(wdir)
    tp, n = cfg.tensor_para_size, values_per_rank(cfg, params.granularity)
    heads_r = cfg.kv_head_num // tp
    written: list[Path] = []
    with staged_files() as stage:
        for i in range(cfg.num_layer):
            rows = torch.stack(params.layer(i)).to(torch.float32)  # (4, kv_head_num)
            for r in range(tp):
                block = rows[:, r * heads_r : (r + 1) * heads_r]  # (4, heads_r)
                if n == 1:
                    if not torch.all(block == block[:, :1]):
                        raise ValueError(f"layer {i} rank {r}: per-tensor parameters differ across heads")
                    block = block[:, :1]
                final = wdir / file_name(i, r, params.kv_dtype, params.granularity)
                block.numpy().astype("<f4").tofile(stage(final))
                written.append(final)
    return written


def read(
    wdir: str | os.PathLike, cfg: WorkspaceConfig, kv_dtype: str, granularity: str, rank: int | None = None
) -> KVParams:
    """Load and validate the layer files for (kv_dtype, granularity); expand to per head.

    rank None: every rank's files, joined -> (num_layer, kv_head_num). rank r (a tensor-parallel process):
    only rank r's files -> (num_layer, kv_head_num / tp), the parameters of that rank's KV heads.
    """
    wdir = Path(wdir)
    tp, n = cfg.tensor_para_size, values_per_rank(cfg, granularity)
    heads_r = cfg.kv_head_num // tp
    if rank is not None and not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside tensor_para_size {tp} (ranks 0..{tp - 1})")
    ranks = range(tp) if rank is None else [rank]
    out = torch.empty(4, cfg.num_layer, heads_r * len(ranks), dtype=torch.float32)
    for i in range(cfg.num_layer):
        for j, r in enumerate(ranks):
            path = wdir / file_name(i, r, kv_dtype, granularity)
            if not path.is_file():
                raise KVParamsError(
                    f"{kv_dtype} KV cache ({granularity} scales) needs {path}, which is missing; "
                    + _other_files(wdir, cfg, kv_dtype, granularity)
                    + _fix(wdir, kv_dtype, granularity)
                )
            size = path.stat().st_size
            if size != 16 * n:
                raise KVParamsError(
                    f"{path} has {size} bytes, expected {16 * n} (float32 [k_scale, k_zp, v_scale, v_zp]"
                    f" x {n}); " + _fix(wdir, kv_dtype, granularity)
                )
            block = torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(4, n).copy())
            if not torch.isfinite(block).all() or (block[[0, 2]] <= 0).any():
                raise KVParamsError(
                    f"{path} holds {block.flatten().tolist()}: scales must be finite and > 0, "
                    "zero points finite; " + _fix(wdir, kv_dtype, granularity)
                )
            if kv_dtype != "int8" and (block[[1, 3]] != 0).any():
                raise KVParamsError(
                    f"{path}: fp8 parameters must have zero zero-points; " + _fix(wdir, kv_dtype, granularity)
                )
            out[:, i, j * heads_r : (j + 1) * heads_r] = block.expand(4, heads_r) if n == 1 else block
    return KVParams(kv_dtype, granularity, out[0].clone(), out[1].clone(), out[2].clone(), out[3].clone())


def _other_files(wdir: Path, cfg: WorkspaceConfig, kv_dtype: str, granularity: str) -> str:
    """The start of a missing-file message's fix when other parameter files are there (e.g. config.ini says
    head, inherited from INT8, but FP8 was calibrated per tensor)."""
    other = "tensor" if granularity == "head" else "head"
    if (kv_dtype, other) in available(wdir, cfg):
        return (
            f"the {other} granularity's {kv_dtype} files ({file_name(0, 0, kv_dtype, other)} ...) exist: use them "
            f'with --kv-granularity {other} (runtime.chat), LLM(..., kv_granularity="{other}") or '
            f"kv_granularity = {other} in config.ini, or "
        )
    present = [f"{d} {g}" for d, g in available(wdir, cfg)]
    return f"parameter files present: {', '.join(present)}; " if present else ""


def available(wdir: str | os.PathLike, cfg: WorkspaceConfig) -> list[tuple[str, str]]:
    """(kv_dtype, granularity) pairs whose layer-0 rank-0 file exists (a quick listing for messages)."""
    wdir = Path(wdir)
    return [(d, g) for d in QUANTIZED_DTYPES for g in ("tensor", "head") if (wdir / file_name(0, 0, d, g)).is_file()]
