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


# ---------------------------------------------------------------------------------------------
# Online per-(token, KV head) modes (vLLM's names). No calibration: each cached row x (D values of one token and
# one KV head) carries its own parameters, computed when the row is written, stored as fp16 beside the data:
#     int8_per_token_head  asymmetric, 8 bits: scale = (max - min) / 255, zero = min
#     int4_per_token_head  asymmetric, 4 bits: scale = (max - min) / 15,  zero = min; two values per byte
#     fp8_per_token_head   E4M3:               scale = absmax / 448,       zero = 0
# The parameters are rounded to fp16 first and the row is quantized with the rounded values (what is stored is
# what is used on both sides):
#     integer:  q = clamp(round_half_even((x - zero) / scale), 0, 2^b - 1)      x^ = q * scale + zero
#     fp8:      f = cast_rne(clamp(x / scale, +-448))                            x^ = f * scale
# A row whose values are all equal (scale 0 in fp16) stores q = 0 and reads back zero exactly (fp8: 0); the
# division is a true (IEEE, correctly rounded) division by scale elsewhere, and is skipped there: never inf or NaN. Integer codes are unsigned: uint8 storage
# (0..255) for 8 bits; for 4 bits element 2i goes to the low nibble and element 2i + 1 to the high nibble of
# byte i, so a row of D values is D / 2 bytes. Parameters: (..., 2) float16 = (scale, zero) per row.
ONLINE_MODES = ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head")
ONLINE_BITS = {"int8_per_token_head": 8, "int4_per_token_head": 4}
ONLINE_STORAGE = {
    "int8_per_token_head": torch.uint8,
    "int4_per_token_head": torch.uint8,
    "fp8_per_token_head": torch.float8_e4m3fn,
}
PARAM_DTYPE = torch.float16  # (scale, zero) per row: 4 bytes


def is_online(kv_dtype: str) -> bool:
    return kv_dtype in ONLINE_MODES


def channel_keys(kv_dtype: str | None) -> bool:
    """Whether the mode stores keys per channel within a block (int4_per_token_head, see `quantize_channels`)."""
    return kv_dtype == "int4_per_token_head"


def kv_row_bytes(kv_dtype: str, head_dim: int, block_size: int = 64) -> float:
    """Bytes of one cached row (one token, one KV head; the mean of a K and a V row) in any mode, an online
    mode's parameters included (INT4's per-block key parameters spread over the block_size rows)."""
    if is_online(kv_dtype):
        return online_row_bytes(kv_dtype, head_dim, block_size)
    return head_dim * BYTES_PER_ELEM[kv_dtype]


def row_width(kv_dtype: str | None, head_dim: int) -> int:
    """Stored elements per cached row, the pools' last dimension: D, or D / 2 bytes for packed INT4."""
    return head_dim // 2 if kv_dtype == "int4_per_token_head" else head_dim


def online_row_bytes(kv_dtype: str, head_dim: int, block_size: int = 64) -> float:
    """Bytes of one cached row (one token, one KV head), the mean of K and V: data plus its parameters. Per-row
    modes: 4 bytes of (scale, zero). int4_per_token_head: V rows the same, K rows 4 * D / block_size (a (scale,
    zero) per channel per block, `channel_keys`). An int where the mean is whole."""
    data = row_width(kv_dtype, head_dim)
    if channel_keys(kv_dtype):
        k_params = 2 * head_dim * PARAM_DTYPE.itemsize / block_size
        mean = data + (k_params + 2 * PARAM_DTYPE.itemsize) / 2
        return int(mean) if mean == int(mean) else mean
    return data + 2 * PARAM_DTYPE.itemsize


def online_params(x: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """Per-row (scale, zero) of x (..., D), rounded to fp16: (..., 2) float16."""
    xf = x.to(torch.float32)
    if kv_dtype == "fp8_per_token_head":
        scale = xf.abs().amax(-1) / FP8_MAX["fp8_e4m3"]
        zero = torch.zeros_like(scale)
    else:
        mn, mx = xf.amin(-1), xf.amax(-1)
        scale, zero = (mx - mn) / (2 ** ONLINE_BITS[kv_dtype] - 1), mn
    return torch.stack((scale, zero), -1).to(PARAM_DTYPE)


def _divide(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y (..., D) / scale (...,) per row, 0 where scale is 0 (an all-equal row)."""
    scale = scale.unsqueeze(-1)
    live = scale > 0
    return torch.where(live, y / torch.where(live, scale, torch.ones_like(scale)), torch.zeros_like(y))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (..., D) in 0..15 (any integer dtype) -> (..., D / 2) uint8, element 2i low nibble, 2i + 1 high."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(..., D / 2) uint8 -> codes (..., D) uint8 in 0..15."""
    return torch.stack((p & 0xF, p >> 4), -1).flatten(-2)


def quantize_online(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> (stored data, params (..., 2) fp16); data (..., D) uint8 / fp8 or (..., D / 2) uint8."""
    params = online_params(x, kv_dtype)
    scale, zero = params.to(torch.float32).unbind(-1)
    xf = x.to(torch.float32)
    if kv_dtype == "fp8_per_token_head":
        fmax = FP8_MAX["fp8_e4m3"]
        y = _divide(xf, scale).clamp_(-fmax, fmax)
        return y.to(torch.float8_e4m3fn), params
    top = 2 ** ONLINE_BITS[kv_dtype] - 1
    q = torch.round(_divide(xf - zero.unsqueeze(-1), scale)).clamp_(0, top).to(torch.uint8)
    return (pack_int4(q) if top == 15 else q), params


def dequantize_online(
    data: torch.Tensor, params: torch.Tensor, kv_dtype: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Stored rows and their (scale, zero) -> x^ (..., D) = q * scale + zero, in fp32 then cast to `dtype`."""
    scale, zero = params.to(torch.float32).unbind(-1)
    if kv_dtype == "int4_per_token_head":
        data = unpack_int4(data)
    return (data.to(torch.float32) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).to(dtype)


# int4_per_token_head keys, per channel (KIVI). Post-RoPE keys carry large per-channel offsets that drift slowly
# with position, so a range per (token, head) row is wide and 16 levels lose the small differences between
# tokens that attention reads; a range per channel over the block_size tokens of a block is narrow. Measured on
# SmolLM2-135M (12 windows x 512 of the Debian FAQ, fake-quantized K, V per row with rotation): mean KL to an fp16
# cache 0.044 per row, 0.021 per channel; 8-bit keys would cost 2.5x fp16's tokens instead of 3.6x. Values keep
# the per-row format (their error is 8x smaller). A block's keys are quantized per channel once its last row is
# written (`KVCache.write`); until then its rows are int8_per_token_head rows ("open" rows) in the half-block
# layout, rows [0, bs/2) in the block itself and [bs/2, bs) in its sequence's next block (the helper block,
# which the scheduler keeps allocated while a block is open). Every full block is quantized from the int8
# read-back of its rows x~ = dequantize(quantize_int8_per_token_head(x)), whether they were written one decode
# step at a time or in one prefill:
#     per channel c over the block's rows r:  scale_c = fp16((max_r x~ - min_r x~) / 15), zero_c = fp16(min_r x~)
#     q[r, c] = clamp(round_half_even((x~[r, c] - zero_c) / scale_c), 0, 15)     x^[r, c] = q * scale_c + zero_c
# stored as rows of D / 2 packed bytes like the values; params (..., 2, D) fp16 = (scale row, zero row).
def quantize_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., T, D) float, the T rows of one block and head -> (data (..., T, D / 2) uint8, params (..., 2, D) fp16)."""
    xt = x.to(torch.float32).transpose(-1, -2)  # (..., D, T): a channel's values as one "row"
    params = online_params(xt, "int4_per_token_head")  # (..., D, 2)
    scale, zero = params.to(torch.float32).unbind(-1)
    q = torch.round(_divide(xt - zero.unsqueeze(-1), scale)).clamp_(0, 15)
    return pack_int4(q.transpose(-1, -2)), params.transpose(-1, -2).contiguous()


def dequantize_channels(data: torch.Tensor, params: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(data (..., T, D / 2), params (..., 2, D)) -> x^ (..., T, D) = q * scale_c + zero_c, in fp32 then `dtype`."""
    scale, zero = params.to(torch.float32).unsqueeze(-3).unbind(-2)  # (..., 1, D) each
    return (unpack_int4(data).to(torch.float32) * scale + zero).to(dtype)


def channel_block_fits(block_size: int, head_dim: int) -> bool:
    """Whether blocks of block_size rows can hold per-channel keys: an open block's rows are split in two halves,
    and each half's (scale, zero) pairs live in one block's (2, D) parameter area, so an even size <= 2 * D."""
    return block_size % 2 == 0 and block_size <= 2 * head_dim


def int8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) -> its int8_per_token_head read-back in fp32: what an open key row holds."""
    return dequantize_online(*quantize_online(x, "int8_per_token_head"), "int8_per_token_head")


def hadamard(d: int, seed: int = 0) -> torch.Tensor:
    """Randomized orthonormal Hadamard matrix R = diag(s) H_d / sqrt(d), (d, d) fp32, d a power of two.

    s is a seeded random +-1 vector. Rows rotate as x @ R; R @ R.T = I, so (q R) . (k R) = q . k, and a value
    row read back as (v R) is undone by @ R.T. Rotation spreads an outlier channel over all d channels, which
    is what makes per-row 4-bit ranges tight.
    """
    if d < 1 or d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head size; got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # Sylvester construction
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1
    return (signs.view(-1, 1) * h / d**0.5).to(torch.float32)
