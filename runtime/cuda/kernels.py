"""GPU launchers for the paged KV-cache kernels (kv_write.cu, decode_attention.cu), compiled by CuPy at first use.

    kv_cache_write(k_pool, v_pool, k_new, v_new, slot_mapping, k_scale, k_zp, v_scale, v_zp, kv_dtype,
                   k_param=None, v_param=None, k_helper=None, k_complete=None)
    decode_attention(q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp, kv_dtype,
                     softmax_scale, max_length=None, k_param=None, v_param=None) -> out (B, H, D)

Arguments are torch CUDA tensors in the engine's paged layout: per-layer pools (num_blocks, H_kv, block_size, D)
contiguous in the storage dtype of `kv_dtype` (runtime/quant.py STORAGE_DTYPES / ONLINE_STORAGE; int4 pools are
(num_blocks, H_kv, block_size, D / 2) uint8, two codes per byte); token t of sequence b in block
block_tables[b, t // block_size], row t % block_size. New K/V (N, H_kv, D) and q (B, H, D) in fp32 / fp16 / bf16;
slot_mapping (N,) = block_id * block_size + row (negative = skip), int32 or int64; block_tables (B, max_blocks)
and lengths (B,) int32 (built once per step and shared by every layer, so no per-layer conversion is hidden
here). Calibrated modes take per-KV-head fp32 parameters (H_kv,) (None where the mode does not use them) and no
param pools; the online modes (*_per_token_head) take k_scale ... v_zp = None and the fp16 param pools k_param,
v_param (num_blocks, H_kv, block_size, 2) = (scale, zero) per row, which kv_cache_write fills and
decode_attention reads. int4_per_token_head keeps its keys per channel within a block (KIVI; runtime/quant.py
quantize_channels and runtime/kv_cache.py define the format): k_param is (num_blocks, H_kv, 2, D) = (scale row,
zero row) per block and head, a sequence's open (last, partial) block holds int8 rows in the half-block layout,
the second half in the next block of its table (the helper), and kv_cache_write takes the step's KeyPlan
(runtime.kv_cache.key_plan) as k_helper (N,) and k_complete (M, 4), int32 or int64. Every argument is checked
(dtype, shape, contiguity, device, alignment) before anything launches; `prepare_write` / `prepare_attention`
do the checks and the grid choice without touching a GPU, and the CPU emulation (host_ops.py) goes through the
same two functions. Values inside the index tensors are not checked (that would synchronise with the GPU): the
kernels skip slots (and int4 helper blocks, k_complete entries) outside the pool or the step and never dereference
a block id outside it; an open block whose helper entry is missing has its second-half keys dropped.

CuPy is imported inside the functions that launch, so importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.quant import FP8_DTYPES, ONLINE_STORAGE, PARAM_DTYPE, STORAGE_DTYPES, channel_block_fits, is_online

CUDA_DIR = Path(__file__).resolve().parent
KV_MODES = {  # kvq_common.cuh KVQ_MODE_*
    "fp16": 0,
    "int8": 1,
    "fp8_e4m3": 2,
    "fp8_e5m2": 3,
    "int8_per_token_head": 4,
    "fp8_per_token_head": 5,
    "int4_per_token_head": 6,
}
POOL_DTYPES = {**STORAGE_DTYPES, **ONLINE_STORAGE}
# Activation dtypes (q, k_new, v_new, out): torch dtype -> (host dtype code, C++ type).
ACT_TYPES = {torch.float32: (0, "float"), torch.float16: (1, "__half"), torch.bfloat16: (2, "__nv_bfloat16")}
HEAD_DIMS = (64, 128)
WRITE_THREADS, ATTN_THREADS = 256, 128  # must match kv_write.cu / decode_attention.cu
CHANNEL_THREADS = 128  # kv_write.cu KVQ_CHANNEL_THREADS: kv_stash_open_keys, kv_write_channel_keys
CHANNEL_KEYS = "int4_per_token_head"  # keys per channel within a block (quant.channel_keys)
MAX_WRITE_BLOCKS = 65535  # kv_write is grid-stride, so any grid size is correct
MIN_CHUNK = 256  # keys per split-K block: below this the combine pass costs more than it saves
INT32_MAX = 2**31 - 1  # the kernels index positions and slots with int


class CudaOpError(ValueError):
    """A CUDA op was called with arguments it cannot launch on; the message names the argument and the fix."""


def write_name_expressions() -> list[str]:
    """Every kv_write instantiation the launchers can use (input dtype x storage mode, online modes included),
    plus int4_per_token_head's per-channel key kernels (kv_stash_open_keys, kv_write_channel_keys per input dtype)."""
    names = [f"kv_write<{ctype}, {mode}>" for _, ctype in ACT_TYPES.values() for mode in KV_MODES.values()]
    return [*names, "kv_stash_open_keys", *(f"kv_write_channel_keys<{ctype}>" for _, ctype in ACT_TYPES.values())]


def attention_name_expressions() -> list[str]:
    """Every decode_attention / combine instantiation the launchers can use (q dtype x mode x head_dim)."""
    names = []
    for _, ctype in ACT_TYPES.values():
        for dim in HEAD_DIMS:
            names += [f"decode_attention<{ctype}, {mode}, {dim}>" for mode in KV_MODES.values()]
            names.append(f"decode_attention_combine<{ctype}, {dim}>")
    return names


SOURCES = {"kv_write.cu": write_name_expressions, "decode_attention.cu": attention_name_expressions}


def load_source(name: str) -> str:
    """The .cu text with kvq_common.cuh inlined, so a compile cache keyed on the text sees header edits."""
    text = (CUDA_DIR / name).read_text()
    common = (CUDA_DIR / "kvq_common.cuh").read_text()
    return text.replace('#include "kvq_common.cuh"', common)


@dataclass(frozen=True)
class WriteLaunch:
    """Checked arguments of one kv_write launch."""

    mode: int
    act_code: int
    act_ctype: str
    num_tokens: int
    num_kv_heads: int
    num_blocks: int
    block_size: int
    head_dim: int
    slot_mapping: torch.Tensor  # (N,) int32 contiguous
    grid: int
    k_helper: torch.Tensor | None = None  # int4_per_token_head: (N,) int32 contiguous
    k_complete: torch.Tensor | None = None  # int4_per_token_head: (M, 4) int32 contiguous

    @property
    def num_complete(self) -> int:
        """Blocks this write completes (int4_per_token_head keys; 0 otherwise)."""
        return 0 if self.k_complete is None else self.k_complete.shape[0]


@dataclass(frozen=True)
class AttentionLaunch:
    """Checked arguments of one decode_attention launch (plus the split-K plan)."""

    mode: int
    act_code: int
    act_ctype: str
    batch: int
    num_heads: int
    num_kv_heads: int
    num_blocks: int
    block_size: int
    max_blocks: int
    head_dim: int
    num_splits: int
    chunk: int


def _fail(what: str, got: object, want: str) -> None:
    raise CudaOpError(f"runtime/cuda: {what} is {got}, expected {want}")


def _check_tensor(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, type(t).__name__, "a torch.Tensor")
    if tuple(t.shape) != shape:
        _fail(f"{name}.shape", tuple(t.shape), str(shape))
    if dtype is not None and t.dtype != dtype:
        _fail(f"{name}.dtype", t.dtype, str(dtype))
    if not t.is_contiguous():
        _fail(f"{name}", "non-contiguous", "a contiguous tensor (call .contiguous())")
    if t.device != device:
        _fail(f"{name}.device", t.device, f"{device} (all arguments on one device)")


def _check_pools(kv_dtype: str, k_pool: torch.Tensor, v_pool: torch.Tensor) -> tuple[int, int]:
    """Both pools (num_blocks, H_kv, block_size, D) (int4: D / 2) contiguous in kv_dtype's storage dtype;
    returns (mode code, head_dim D)."""
    if kv_dtype not in KV_MODES:
        _fail("kv_dtype", repr(kv_dtype), f"one of {sorted(KV_MODES)}")
    packed = kv_dtype == "int4_per_token_head"  # two codes per byte
    if not isinstance(k_pool, torch.Tensor) or k_pool.dim() != 4:
        last = "D / 2" if packed else "D"
        _fail("k_pool.shape", tuple(getattr(k_pool, "shape", ())), f"(num_blocks, H_kv, block_size, {last})")
    want = POOL_DTYPES[kv_dtype]
    if k_pool.dtype != want:
        _fail("k_pool.dtype", k_pool.dtype, f"{want} for kv_dtype={kv_dtype!r}")
    head_dim = k_pool.shape[-1] * (2 if packed else 1)
    if head_dim not in HEAD_DIMS:
        what = f"one of {HEAD_DIMS}" + (" (the int4 pool's last dim is D / 2)" if packed else "")
        _fail("head_dim", head_dim, f"{what} (kernels are instantiated for these)")
    if k_pool.shape[2] < 1:
        _fail("block_size", k_pool.shape[2], ">= 1")
    _check_tensor("k_pool", k_pool, tuple(k_pool.shape), want, k_pool.device)
    _check_tensor("v_pool", v_pool, tuple(k_pool.shape), want, k_pool.device)
    return KV_MODES[kv_dtype], head_dim


def _check_params(kv_dtype: str, k_pool: torch.Tensor, **params: torch.Tensor | None) -> None:
    """Calibrated modes: scales for int8/fp8, zero points for int8, fp32 (H_kv,) each, and no param pools.
    Online modes: k_param / v_param fp16 (num_blocks, H_kv, block_size, 2), 4-byte aligned, and no per-head
    parameters (each row's own (scale, zero) replace them); int4_per_token_head's k_param is per channel,
    (num_blocks, H_kv, 2, D), 16-byte aligned, and its block_size even and at most 2 * D."""
    num_blocks, num_kv_heads, block_size, width = k_pool.shape
    online = is_online(kv_dtype)
    channel_keys = kv_dtype == CHANNEL_KEYS
    if channel_keys and not channel_block_fits(block_size, 2 * width):
        _fail("block_size", block_size, f"even and <= 2 * D = {4 * width} for kv_dtype={kv_dtype!r} (open key rows)")
    for name, p in params.items():
        is_pool = name.endswith("_param")
        if is_pool and channel_keys and name == "k_param":
            shape, dtype = (num_blocks, num_kv_heads, 2, 2 * width), PARAM_DTYPE
            needed = True
            want = (
                f"a {shape} float16 pool for kv_dtype={kv_dtype!r}: per-channel keys, (scale row, zero row) per "
                "block and head (runtime/quant.py quantize_channels), not (scale, zero) per row"
            )
        elif is_pool:
            shape, dtype = (num_blocks, num_kv_heads, block_size, 2), PARAM_DTYPE
            needed, want = online, f"a {shape} float16 (scale, zero) pool for kv_dtype={kv_dtype!r}"
        else:
            shape, dtype = (num_kv_heads,), torch.float32
            needed = kv_dtype in ("int8", *FP8_DTYPES) and (name.endswith("scale") or kv_dtype == "int8")
            want = f"a (H_kv,) float32 tensor for kv_dtype={kv_dtype!r}"
        if p is None:
            if needed:
                _fail(name, None, want)
            continue
        if online != is_pool:
            fix = "the per-row params live in k_param / v_param" if online else "only the online modes read it"
            _fail(name, "a tensor", f"None for kv_dtype={kv_dtype!r} ({fix})")
        if is_pool and isinstance(p, torch.Tensor) and tuple(p.shape) != shape:
            _fail(f"{name}.shape", tuple(p.shape), want)
        _check_tensor(name, p, shape, dtype, k_pool.device)
        align = 16 if is_pool and channel_keys and name == "k_param" else 4
        if is_pool and p.data_ptr() % align:
            what = "16-byte loads of the channel params" if align == 16 else "read as __half2"
            _fail(f"{name}.data_ptr() % {align}", p.data_ptr() % align, f"0 ({what}; use a fresh allocation)")


def _check_index(name: str, t: torch.Tensor, shape: tuple, device: torch.device, dtypes: tuple) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        _fail(f"{name}.dtype", getattr(t, "dtype", type(t).__name__), want)
    _check_tensor(name, t, shape, None, device)


def _check_activation(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> tuple[int, str]:
    if not isinstance(t, torch.Tensor) or t.dtype not in ACT_TYPES:
        _fail(f"{name}.dtype", getattr(t, "dtype", type(t).__name__), "float32, float16 or bfloat16")
    _check_tensor(name, t, shape, t.dtype, device)
    return ACT_TYPES[t.dtype]


def write_grid(num_elements: int) -> int:
    """kv_write blocks: one element of K and V per thread, capped (the kernel is grid-stride)."""
    return max(1, min(MAX_WRITE_BLOCKS, math.ceil(num_elements / WRITE_THREADS)))


def plan_splits(batch: int, num_heads: int, max_length: int, num_sms: int) -> tuple[int, int]:
    """(num_splits, chunk) for decode_attention: split long contexts until ~4 blocks per SM are in flight.

    With batch x heads blocks already filling the GPU, one split (no combine pass); otherwise split into
    chunks of at least MIN_CHUNK keys. chunk * num_splits >= max_length always.
    """
    max_length = max(1, max_length)
    want = math.ceil(4 * num_sms / max(1, batch * num_heads))
    splits = max(1, min(want, math.ceil(max_length / MIN_CHUNK)))
    chunk = math.ceil(max_length / splits)
    return math.ceil(max_length / chunk), chunk


def _check_key_plan(kv_dtype: str, k_helper, k_complete, num_tokens: int, num_blocks: int, device) -> tuple:
    """int4_per_token_head: the step's KeyPlan as k_helper (N,) and k_complete (M, 4), int32 or int64 (converted
    to int32, int64 values clamped first so that none wraps into the pool); other modes: both None."""
    if kv_dtype != CHANNEL_KEYS:
        for name, t in (("k_helper", k_helper), ("k_complete", k_complete)):
            if t is not None:
                _fail(name, "a tensor", f"None for kv_dtype={kv_dtype!r} (only {CHANNEL_KEYS!r} keys are per channel)")
        return None, None
    for name, t in (("k_helper", k_helper), ("k_complete", k_complete)):
        if t is None:
            _fail(name, None, f"the step's KeyPlan for kv_dtype={kv_dtype!r} (runtime.kv_cache.key_plan)")
    _check_index("k_helper", k_helper, (num_tokens,), device, (torch.int32, torch.int64))
    if not isinstance(k_complete, torch.Tensor) or k_complete.dim() != 2 or k_complete.shape[1] != 4:
        _fail("k_complete.shape", tuple(getattr(k_complete, "shape", ())), "(M, 4) = (block, helper, r0, i0)")
    _check_index("k_complete", k_complete, tuple(k_complete.shape), device, (torch.int32, torch.int64))
    if k_helper.dtype == torch.int64:
        k_helper = k_helper.clamp(-1, num_blocks).int()
    if k_complete.dtype == torch.int64:
        k_complete = k_complete.clamp(-1, INT32_MAX).int()
    return k_helper, k_complete


def prepare_write(
    k_pool,
    v_pool,
    k_new,
    v_new,
    slot_mapping,
    k_scale,
    k_zp,
    v_scale,
    v_zp,
    kv_dtype: str,
    k_param=None,
    v_param=None,
    k_helper=None,
    k_complete=None,
) -> WriteLaunch:
    """Check every kv_cache_write argument (any device) and choose the grid."""
    mode, head_dim = _check_pools(kv_dtype, k_pool, v_pool)
    num_blocks, num_kv_heads, block_size = k_pool.shape[:3]
    device = k_pool.device
    if num_blocks * block_size > INT32_MAX:
        _fail("num_blocks * block_size", num_blocks * block_size, f"<= {INT32_MAX} (slots are int32 in the kernel)")
    if not isinstance(k_new, torch.Tensor) or k_new.dim() != 3:
        _fail("k_new.shape", tuple(getattr(k_new, "shape", ())), "(N, H_kv, D)")
    num_tokens = k_new.shape[0]
    act_code, act_ctype = _check_activation("k_new", k_new, (num_tokens, num_kv_heads, head_dim), device)
    _check_tensor("v_new", v_new, tuple(k_new.shape), k_new.dtype, device)
    _check_params(
        kv_dtype, k_pool, k_scale=k_scale, k_zp=k_zp, v_scale=v_scale, v_zp=v_zp, k_param=k_param, v_param=v_param
    )
    _check_index("slot_mapping", slot_mapping, (num_tokens,), device, (torch.int32, torch.int64))
    k_helper, k_complete = _check_key_plan(kv_dtype, k_helper, k_complete, num_tokens, num_blocks, device)
    return WriteLaunch(
        mode,
        act_code,
        act_ctype,
        num_tokens,
        num_kv_heads,
        num_blocks,
        block_size,
        head_dim,
        # int64 slots clamped first so that no out-of-range value wraps into the pool; int32 passes as is
        slot_mapping if slot_mapping.dtype == torch.int32 else slot_mapping.clamp(-1, num_blocks * block_size).int(),
        # online modes: one warp (32 threads) per row, which reduces the row to its (scale, zero)
        write_grid(num_tokens * num_kv_heads * (32 if is_online(kv_dtype) else head_dim)),
        k_helper,
        k_complete,
    )


def prepare_attention(
    q,
    k_pool,
    v_pool,
    block_tables,
    lengths,
    k_scale,
    k_zp,
    v_scale,
    v_zp,
    kv_dtype: str,
    max_length: int | None,
    num_sms: int,
    num_splits: int | None = None,
    k_param=None,
    v_param=None,
) -> AttentionLaunch:
    """Check every decode_attention argument (any device) and plan the split-K grid.

    max_length bounds lengths (default: the block table's reach, max_blocks * block_size; pass the true
    maximum to avoid empty splits); num_splits forces a plan (tests), else plan_splits decides.
    """
    mode, head_dim = _check_pools(kv_dtype, k_pool, v_pool)
    num_blocks, num_kv_heads, block_size = k_pool.shape[:3]
    device = k_pool.device
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.data_ptr() % 16:
            _fail(f"{name}.data_ptr() % 16", t.data_ptr() % 16, "0 (16-byte loads; use a fresh allocation)")
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        _fail("q.shape", tuple(getattr(q, "shape", ())), "(B, H, D)")
    batch, num_heads = q.shape[:2]
    act_code, act_ctype = _check_activation("q", q, (batch, num_heads, head_dim), device)
    if num_heads % num_kv_heads:
        _fail("num_heads % num_kv_heads", f"{num_heads} % {num_kv_heads}", "0 (GQA groups of equal size)")
    _check_params(
        kv_dtype, k_pool, k_scale=k_scale, k_zp=k_zp, v_scale=v_scale, v_zp=v_zp, k_param=k_param, v_param=v_param
    )
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2:
        _fail("block_tables.shape", tuple(getattr(block_tables, "shape", ())), f"(B={batch}, max_blocks)")
    max_blocks = block_tables.shape[1]
    _check_index("block_tables", block_tables, (batch, max_blocks), device, (torch.int32,))
    _check_index("lengths", lengths, (batch,), device, (torch.int32,))
    capacity = max_blocks * block_size  # positions a block table reaches
    if capacity > INT32_MAX:
        _fail("max_blocks * block_size", capacity, f"<= {INT32_MAX} (positions are int32 in the kernel)")
    max_length = capacity if max_length is None else min(max_length, capacity)
    if num_splits is None:
        num_splits, chunk = plan_splits(batch, num_heads, max_length, num_sms)
    else:
        chunk = math.ceil(max(1, max_length) / num_splits)
    return AttentionLaunch(
        mode,
        act_code,
        act_ctype,
        batch,
        num_heads,
        num_kv_heads,
        num_blocks,
        block_size,
        max_blocks,
        head_dim,
        num_splits,
        chunk,
    )


# ---- GPU side (CuPy) ---------------------------------------------------------------------------------------


@functools.cache
def _module(name: str):
    """cupy.RawModule for one .cu file with all its template instantiations (compiled once, cached by CuPy)."""
    import cupy

    from runtime.cuda.toolchain import nvrtc_options

    return cupy.RawModule(code=load_source(name), options=tuple(nvrtc_options()), name_expressions=SOURCES[name]())


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _ptr(t: torch.Tensor | None):
    import numpy

    return numpy.uint64(0 if t is None else t.data_ptr())  # raw device pointer, any dtype (fp8 included)


_STREAMS: dict = {}  # (device index, cudaStream_t) -> CuPy's handle on that torch stream, made once


def _cupy_stream(index: int):
    """CuPy's handle on torch's current stream of device `index`, so kernels queue behind torch's work on it
    (Stream.from_external where CuPy and torch speak the CUDA stream protocol, else ExternalStream)."""
    import cupy

    stream = torch.cuda.current_stream(index)
    key = (index, stream.cuda_stream)
    if key not in _STREAMS:
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
            _STREAMS[key] = cupy.cuda.Stream.from_external(stream)
        else:
            _STREAMS[key] = cupy.cuda.ExternalStream(stream.cuda_stream, index)
    return _STREAMS[key]


def _run(device: torch.device, name: str, expression: str, grid: tuple, block: tuple, args: tuple) -> None:
    import cupy

    if device.type != "cuda":
        _fail("device", device, "a CUDA device (use runtime/cuda/host_ops.py for the CPU emulation)")
    index = torch.cuda.current_device() if device.index is None else device.index
    with cupy.cuda.Device(index), _cupy_stream(index):
        _module(name).get_function(expression)(grid, block, args)


def channel_key_stash(w: WriteLaunch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for the completed blocks' earlier open key rows: (M, H_kv, block_size, D) uint8 codes and
    (M, H_kv, block_size, 2) fp16 (scale, zero) (kv_write.cu kv_stash_open_keys)."""
    rows = (w.num_complete, w.num_kv_heads, w.block_size)
    return (
        torch.empty(*rows, w.head_dim, dtype=torch.uint8, device=device),
        torch.empty(*rows, 2, dtype=PARAM_DTYPE, device=device),
    )


def kv_cache_write(
    k_pool,
    v_pool,
    k_new,
    v_new,
    slot_mapping,
    k_scale,
    k_zp,
    v_scale,
    v_zp,
    kv_dtype: str,
    k_param=None,
    v_param=None,
    k_helper=None,
    k_complete=None,
) -> None:
    """Quantize k_new / v_new (N, H_kv, D) into the pools (num_blocks, H_kv, block_size, D) at slot_mapping[n]
    (online modes: also each row's (scale, zero) into k_param / v_param). int4_per_token_head keys follow the
    step's KeyPlan k_helper / k_complete: three launches, the completed blocks' earlier open rows stashed, then
    the rows (open keys, values), then the completed blocks' per-channel keys."""
    import numpy

    w = prepare_write(
        k_pool,
        v_pool,
        k_new,
        v_new,
        slot_mapping,
        k_scale,
        k_zp,
        v_scale,
        v_zp,
        kv_dtype,
        k_param,
        v_param,
        k_helper,
        k_complete,
    )
    if w.num_tokens == 0:
        return
    i32 = numpy.int32
    dims = (i32(w.num_tokens), i32(w.num_kv_heads), i32(w.num_blocks), i32(w.block_size), i32(w.head_dim))
    device = k_pool.device
    if w.num_complete:
        stash_codes, stash_params = channel_key_stash(w, device)
        args = (_ptr(k_pool), _ptr(k_param), _ptr(w.k_complete), _ptr(stash_codes), _ptr(stash_params), *dims)
        grid = (w.num_complete, w.num_kv_heads)
        _run(device, "kv_write.cu", "kv_stash_open_keys", grid, (CHANNEL_THREADS,), args)
    args = (
        _ptr(k_new),
        _ptr(v_new),
        _ptr(k_pool),
        _ptr(v_pool),
        _ptr(w.slot_mapping),
        _ptr(k_scale),
        _ptr(k_zp),
        _ptr(v_scale),
        _ptr(v_zp),
        _ptr(k_param),
        _ptr(v_param),
        _ptr(w.k_helper),
        *dims,
    )
    _run(device, "kv_write.cu", f"kv_write<{w.act_ctype}, {w.mode}>", (w.grid,), (WRITE_THREADS,), args)
    if w.num_complete:
        args = (
            _ptr(k_new),
            _ptr(k_pool),
            _ptr(k_param),
            _ptr(w.k_complete),
            _ptr(stash_codes),
            _ptr(stash_params),
            *dims,
        )
        expression = f"kv_write_channel_keys<{w.act_ctype}>"
        _run(device, "kv_write.cu", expression, (w.num_complete, w.num_kv_heads), (CHANNEL_THREADS,), args)


def decode_attention(
    q,
    k_pool,
    v_pool,
    block_tables,
    lengths,
    k_scale,
    k_zp,
    v_scale,
    v_zp,
    kv_dtype: str,
    softmax_scale: float,
    max_length: int | None = None,
    k_param=None,
    v_param=None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of q (B, H, D) over each sequence's first lengths[b] tokens, found through its block table."""
    import numpy

    device = k_pool.device
    num_sms = _num_sms(device.index) if device.type == "cuda" else 1
    a = prepare_attention(
        q,
        k_pool,
        v_pool,
        block_tables,
        lengths,
        k_scale,
        k_zp,
        v_scale,
        v_zp,
        kv_dtype,
        max_length,
        num_sms,
        num_splits,
        k_param,
        v_param,
    )
    out = torch.empty_like(q)
    if a.batch == 0:
        return out
    part_o = part_ml = None
    if a.num_splits > 1:
        part_o = torch.empty(a.batch, a.num_heads, a.num_splits, a.head_dim, dtype=torch.float32, device=device)
        part_ml = torch.empty(a.batch, a.num_heads, a.num_splits, 2, dtype=torch.float32, device=device)
    i32 = numpy.int32
    args = (
        _ptr(q),
        _ptr(k_pool),
        _ptr(v_pool),
        _ptr(block_tables),
        _ptr(lengths),
        _ptr(k_scale),
        _ptr(k_zp),
        _ptr(v_scale),
        _ptr(v_zp),
        _ptr(k_param),
        _ptr(v_param),
        numpy.float32(softmax_scale),
        i32(a.num_heads),
        i32(a.num_kv_heads),
        i32(a.num_blocks),
        i32(a.block_size),
        i32(a.max_blocks),
        i32(a.chunk),
        _ptr(out),
        _ptr(part_o),
        _ptr(part_ml),
    )
    expression = f"decode_attention<{a.act_ctype}, {a.mode}, {a.head_dim}>"
    _run(device, "decode_attention.cu", expression, (a.num_heads, a.batch, a.num_splits), (ATTN_THREADS,), args)
    if a.num_splits > 1:
        args = (
            _ptr(part_o),
            _ptr(part_ml),
            _ptr(lengths),
            i32(a.num_heads),
            i32(a.max_blocks),
            i32(a.block_size),
            i32(a.chunk),
            i32(a.num_splits),
            _ptr(out),
        )
        expression = f"decode_attention_combine<{a.act_ctype}, {a.head_dim}>"
        _run(device, "decode_attention.cu", expression, (a.num_heads, a.batch), (a.head_dim,), args)
    return out
