"""The quantize / dequantize formulas: the single definition used by kv_qparams, the KV cache,
eval, and the CUDA kernels' tests as their reference.

INT8 (docs/formats.md §3), all arithmetic in fp32:
    asymmetric:  scale = (max - min) / 255      zp = (max + min) / 2
    symmetric:   scale = absmax / 127           zp = 0
    write:       q  = clamp(round_half_even((x - zp) / scale), -128, 127)
    read:        x^ = q * scale + zp
  Rounding is half-to-even everywhere (torch.round, CUDA __float2int_rn): one rule for prefill and
  decode. (x - zp) / scale reaches +-127.5 at the calibrated ends; +127.5 saturates to 127.

FP8 (docs/formats.md §3), E4M3FN (max 448, no inf) or E5M2 (max 57344):
    scale = amax / fp8_max                     (calibrated; 1.0 when no scale)
    write:  f  = cast_rne(clamp(x / scale, -fp8_max, fp8_max))   # saturate before every cast
    read:   x^ = f * scale
  On-the-fly scales (`calculate_kv_scales`, vLLM's rule): the first prompt's amax with headroom,
  k_scale = amax_k / 200, v_scale = amax_v / 100 for E4M3 (the same 448/200 and 448/100 headroom
  factors for E5M2); later, larger values saturate instead of overflowing.

Scales and zero points broadcast over the KV-head axis: shape (H_kv,) against x (..., H_kv, T, D)
via `per_head`. Per-tensor parameters are expanded to one value per head by the caller.
"""

from __future__ import annotations

import torch

INT8_MIN, INT8_MAX = -128, 127
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
# calculate_kv_scales headroom: scale = amax * headroom / fp8_max (vLLM: amax/200 for K, amax/100 for V at E4M3).
DYNAMIC_HEADROOM = {"k": 448.0 / 200.0, "v": 448.0 / 100.0}
STORAGE_DTYPES = {"fp16": torch.float16, "int8": torch.int8, **FP8_DTYPES}
BYTES_PER_ELEM = {name: torch.empty(0, dtype=dt).element_size() for name, dt in STORAGE_DTYPES.items()}


def per_head(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a (H_kv,) parameter so it broadcasts against x laid out (..., H_kv, T, D)."""
    return p.view(-1, 1, 1) if p.ndim == 1 else p


def int8_params(
    stats_max: torch.Tensor, stats_min: torch.Tensor, stats_absmax: torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zp) from observed max/min/absmax (any shape, reduced by the caller), in fp32."""
    mx, mn, amax = (t.to(torch.float32) for t in (stats_max, stats_min, stats_absmax))
    if symmetric:
        return amax / 127.0, torch.zeros_like(amax)
    return (mx - mn) / 255.0, (mx + mn) / 2.0


def fp8_scale(amax: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """Calibrated FP8 scale: amax / fp8_max, in fp32."""
    return amax.to(torch.float32) / FP8_MAX[kv_dtype]


def dynamic_fp8_scale(amax: torch.Tensor, kv_dtype: str, which: str) -> torch.Tensor:
    """On-the-fly FP8 scale with headroom for later, larger values (which: 'k' or 'v')."""
    scale = amax.to(torch.float32) * DYNAMIC_HEADROOM[which] / FP8_MAX[kv_dtype]
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero prompt keeps scale 1.0


def quantize_int8(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """q = clamp(round_half_even((x - zp) / scale), -128, 127) as int8; x (..., H_kv, T, D)."""
    y = (x.to(torch.float32) - per_head(zp, x)) / per_head(scale, x)
    return torch.round(y).clamp_(INT8_MIN, INT8_MAX).to(torch.int8)


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x^ = q * scale + zp, computed in fp32 then cast to `dtype`."""
    return (q.to(torch.float32) * per_head(scale, q) + per_head(zp, q)).to(dtype)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """Saturating scaled cast: clamp(x / scale, +-fp8_max) rounded to nearest-even in the fp8 format."""
    fmax = FP8_MAX[kv_dtype]
    y = (x.to(torch.float32) / per_head(scale, x)).clamp_(-fmax, fmax)
    return y.to(FP8_DTYPES[kv_dtype])


def dequantize_fp8(f: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x^ = f * scale in fp32, then cast to `dtype`."""
    return (f.to(torch.float32) * per_head(scale, f)).to(dtype)


def quantize(x: torch.Tensor, kv_dtype: str, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Store x in `kv_dtype` (fp16 ignores scale/zp; fp8 ignores zp)."""
    if kv_dtype == "fp16":
        return x.to(torch.float16)
    if kv_dtype == "int8":
        return quantize_int8(x, scale, zp)
    return quantize_fp8(x, scale, kv_dtype)


def dequantize(
    q: torch.Tensor, kv_dtype: str, scale: torch.Tensor, zp: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Read back stored values as `dtype`."""
    if kv_dtype == "fp16":
        return q.to(dtype)
    if kv_dtype == "int8":
        return dequantize_int8(q, scale, zp, dtype)
    return dequantize_fp8(q, scale, dtype)
