"""The CUDA kernels run on the CPU: the same .cu files compiled by g++ under cuda_host_emulation.h (tests only).

Same signatures as kernels.kv_cache_write / kernels.decode_attention (paged pools, block tables, slot mapping),
but for CPU tensors, and through the same argument checks and grid planning (kernels.prepare_write /
prepare_attention). Slow (every CUDA thread is an OS thread): meant for correctness tests on small shapes, not
for serving.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from runtime.cuda.kernels import KV_MODES, channel_key_stash, prepare_attention, prepare_write
from runtime.cuda.toolchain import build_host_library

_P, _I, _F, _LL = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_longlong


@functools.cache
def library() -> ctypes.CDLL:
    lib = build_host_library()
    # kvq_kv_write(in_dtype, mode, k_new, v_new, k_pool, v_pool, slot_mapping, k_scale, k_zp, v_scale, v_zp,
    #              k_param, v_param, k_helper, k_complete, stash_codes, stash_params, num_tokens, num_kv_heads,
    #              num_blocks, block_size, head_dim, grid, num_complete)
    lib.kvq_kv_write.argtypes = [_I, _I, *[_P] * 15, *[_I] * 7]
    # kvq_decode_attention(q_dtype, mode, head_dim, q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp,
    #                      v_scale, v_zp, k_param, v_param, softmax_scale, batch, num_heads, num_kv_heads,
    #                      num_blocks, block_size, max_blocks, chunk, num_splits, out, part_o, part_ml)
    lib.kvq_decode_attention.argtypes = [_I, _I, _I, *[_P] * 11, _F, *[_I] * 8, _P, _P, _P]
    lib.kvq_probe_store.argtypes = [_I, _P, _LL, _F, _F, _P]
    lib.kvq_probe_store.restype = None
    lib.kvq_probe_unpack.argtypes = [_I, _P, _LL, _P]
    lib.kvq_probe_unpack.restype = None
    lib.kvq_probe_from_float.argtypes = [_I, _P, _LL, _P]
    lib.kvq_probe_from_float.restype = None
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
    """CPU emulation of kernels.kv_cache_write (same arguments, CPU tensors; the same launches in the same order)."""
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
    stash_codes = stash_params = None
    if w.num_complete:
        stash_codes, stash_params = channel_key_stash(w, k_pool.device)
    rc = library().kvq_kv_write(
        w.act_code,
        w.mode,
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
        _ptr(w.k_complete),
        _ptr(stash_codes),
        _ptr(stash_params),
        w.num_tokens,
        w.num_kv_heads,
        w.num_blocks,
        w.block_size,
        w.head_dim,
        w.grid,
        w.num_complete,
    )
    if rc != 0:
        raise RuntimeError(f"kvq_kv_write: no variant for dtype code {w.act_code}, mode {w.mode}")


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
    num_sms: int = 132,
) -> torch.Tensor:
    """CPU emulation of kernels.decode_attention; num_sms stands in for the GPU's SM count in the split plan."""
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
        part_o = torch.empty(a.batch, a.num_heads, a.num_splits, a.head_dim, dtype=torch.float32)
        part_ml = torch.empty(a.batch, a.num_heads, a.num_splits, 2, dtype=torch.float32)
    rc = library().kvq_decode_attention(
        a.act_code,
        a.mode,
        a.head_dim,
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
        softmax_scale,
        a.batch,
        a.num_heads,
        a.num_kv_heads,
        a.num_blocks,
        a.block_size,
        a.max_blocks,
        a.chunk,
        a.num_splits,
        _ptr(out),
        _ptr(part_o),
        _ptr(part_ml),
    )
    if rc != 0:
        raise RuntimeError(f"kvq_decode_attention: no variant for dtype {a.act_code}, mode {a.mode}, D {a.head_dim}")
    return out


def probe_store(kind: str, x: torch.Tensor, scale: float = 1.0, zp: float = 0.0) -> torch.Tensor:
    """The kernels' per-element store (kv_dtype name) applied to fp32 x (1-D); returns the stored tensor."""
    from runtime.quant import STORAGE_DTYPES

    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.numel(), dtype=STORAGE_DTYPES[kind])
    library().kvq_probe_store(KV_MODES[kind], x.data_ptr(), x.numel(), scale, zp, out.data_ptr())
    return out


def probe_unpack(kind: str, stored: torch.Tensor) -> torch.Tensor:
    """The attention kernel's read path (stored values as fp32, no scale) over a 1-D stored tensor; int4: the
    unpacked codes, two per byte."""
    stored = stored.contiguous()
    nbytes = stored.numel() * stored.element_size()
    if nbytes % 16:
        raise ValueError(f"probe_unpack: {nbytes} bytes is not a multiple of 16")
    out = torch.empty(stored.numel() * (2 if kind == "int4_per_token_head" else 1), dtype=torch.float32)
    library().kvq_probe_unpack(KV_MODES[kind], stored.data_ptr(), nbytes, out.data_ptr())
    return out


def probe_from_float(dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp32 -> fp16 / bf16 store of activations (from_float<T>) over fp32 x."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.numel(), dtype=dtype)
    code = {torch.float16: 1, torch.bfloat16: 2}[dtype]
    library().kvq_probe_from_float(code, x.data_ptr(), x.numel(), out.data_ptr())
    return out
