"""The KV cache: a pool of fixed-size blocks per layer in the storage dtype; quantize on write, dequantize on read.

Layout (shared with the C++ and CUDA kernels): per layer, K and V pools are `(num_blocks, H_kv, block_size, D)`
contiguous, in torch.float16 | torch.int8 | torch.float8_e4m3fn | torch.float8_e5m2. A sequence owns a list
of blocks (its block table): token t lives in block `block_table[t // block_size]`, row `t % block_size`.
Writes address the pool through a slot mapping, slot = block * block_size + row. K is stored after RoPE
in TurboMind's interleaved channel order. Which blocks belong to whom is `runtime.scheduler`'s business.

Every format-specific step goes through one `KVQuantizer` (quantize / dequantize / the per-head affine
map x^ = scale * q + zp used by the fused attention). The formulas live in `runtime.quant`:
    int8:  q = clamp(round_half_even((x - zp) / scale), -128, 127);   x^ = q * scale + zp
    fp8:   f = cast(clamp(x / scale, +-fp8_max));                      x^ = f * scale
    fp16:  plain cast (scale 1, zp 0)
Parameters come from the workspace files (`runtime.kv_params`) or, for FP8 with calculate_kv_scales,
from the first prompt's per-layer amax with headroom (later, larger values saturate). They are per
layer and KV head, not per block: 16 bytes per (layer, KV head) outside the pool. A later online mode
(scale/zp per token) keeps its side data inside the blocks and counts it in `block_bytes`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from runtime import quant


class KVQuantizer(Protocol):
    """The one place a cache format differs: how values are stored and read back."""

    kv_dtype: str  # fp16 | int8 | fp8_e4m3 | fp8_e5m2
    storage_dtype: torch.dtype

    def bytes_per_elem(self) -> float: ...
    def observe(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...
    def quantize(self, x: torch.Tensor, layer: int, which: str) -> torch.Tensor: ...
    def dequantize(self, q: torch.Tensor, layer: int, which: str, dtype: torch.dtype) -> torch.Tensor: ...
    def affine(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor]: ...


class StaticQuantizer:
    """Per-head (H_kv,) fp32 scale/zp per layer, fixed at load (or set once from the first prompt).

    k_scale, k_zp, v_scale, v_zp: (num_layer, H_kv) fp32. fp16 uses scale 1, zp 0 (never applied).
    `dynamic=True` (FP8 calculate_kv_scales): the first `observe` of each layer sets its scales from
    amax over all heads of that prompt via `quant.dynamic_fp8_scale`.
    """

    def __init__(self, kv_dtype: str, k_scale, k_zp, v_scale, v_zp, *, dynamic: bool = False, device="cpu") -> None:
        self.kv_dtype = kv_dtype
        self.storage_dtype = quant.STORAGE_DTYPES[kv_dtype]

        def own(t: torch.Tensor) -> torch.Tensor:  # a private fp32 copy on the cache's device
            return t.to(device=device, dtype=torch.float32, copy=True).contiguous()

        self.params = {"k": (own(k_scale), own(k_zp)), "v": (own(v_scale), own(v_zp))}
        self.dynamic = dynamic
        self.observed = torch.zeros(k_scale.shape[0], dtype=torch.bool) if dynamic else None

    @classmethod
    def identity(
        cls, kv_dtype: str, num_layer: int, kv_heads: int, *, dynamic: bool = False, device="cpu"
    ) -> StaticQuantizer:
        ones, zeros = torch.ones(num_layer, kv_heads), torch.zeros(num_layer, kv_heads)
        return cls(kv_dtype, ones, zeros, ones, zeros, dynamic=dynamic, device=device)

    def bytes_per_elem(self) -> float:
        return float(quant.BYTES_PER_ELEM[self.kv_dtype])

    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.params.values() for t in pair)

    def observe(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.dynamic or self.observed[layer]:
            return
        for which, x in (("k", k), ("v", v)):
            scale = quant.dynamic_fp8_scale(x.detach().abs().amax(), self.kv_dtype, which)
            self.params[which][0][layer].fill_(scale.item())
        self.observed[layer] = True

    def quantize(self, x: torch.Tensor, layer: int, which: str) -> torch.Tensor:
        """x: (..., H_kv, T, D) in any float dtype -> storage dtype, same shape."""
        scale, zp = self.params[which]
        return quant.quantize(x, self.kv_dtype, scale[layer], zp[layer])

    def dequantize(self, q: torch.Tensor, layer: int, which: str, dtype: torch.dtype) -> torch.Tensor:
        scale, zp = self.params[which]
        return quant.dequantize(q, self.kv_dtype, scale[layer], zp[layer], dtype)

    def affine(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zp), each (H_kv,) fp32, with x^ = scale * stored + zp (fp16: ones and zeros)."""
        scale, zp = self.params[which]
        return scale[layer], zp[layer]


def block_bytes(num_layer: int, kv_heads: int, block_size: int, head_dim: int, bytes_per_elem: float) -> int:
    """Bytes of one block across all layers, K and V (plus per-block side data, none for static scales)."""
    return int(2 * num_layer * kv_heads * block_size * head_dim * bytes_per_elem)


class KVCache:
    """Per-layer K/V block pools `(num_blocks, H_kv, block_size, D)` in the quantizer's storage dtype."""

    def __init__(
        self,
        num_layer: int,
        num_blocks: int,
        kv_heads: int,
        block_size: int,
        head_dim: int,
        quantizer: KVQuantizer,
        device: str | torch.device = "cpu",
        kernels=None,
    ) -> None:
        # kernels: a module with kv_cache_write / decode_attention over this layout (runtime.cuda on a GPU;
        # runtime.cuda.host_ops runs the same kernels on the CPU in tests); None = the PyTorch/C++ CPU path.
        self.kernels = kernels
        self.quantizer = quantizer
        self.num_blocks, self.block_size = num_blocks, block_size
        self.shape = (num_blocks, kv_heads, block_size, head_dim)
        dt = quantizer.storage_dtype
        # zeros, not empty: a never-written row must be finite in case a reader's mask lets 0 * x through
        self.k = [torch.zeros(self.shape, dtype=dt, device=device) for _ in range(num_layer)]
        self.v = [torch.zeros(self.shape, dtype=dt, device=device) for _ in range(num_layer)]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        data = sum(t.numel() * t.element_size() for t in self.k + self.v)
        side = getattr(self.quantizer, "param_bytes", lambda: 0)()
        return data + side

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v `(N, H_kv, D)` (the step's valid tokens) at slot_mapping (N,) = block * block_size + row."""
        self.quantizer.observe(layer, k, v)
        if self.kernels is not None:
            ks, kz = self.quantizer.affine(layer, "k")
            vs, vz = self.quantizer.affine(layer, "v")
            self.kernels.kv_cache_write(
                self.k[layer],
                self.v[layer],
                k.contiguous(),
                v.contiguous(),
                slot_mapping,
                ks,
                kz,
                vs,
                vz,
                self.quantizer.kv_dtype,
            )
            return
        kq = self.quantizer.quantize(k.transpose(0, 1), layer, "k").transpose(0, 1)  # (N, H_kv, D) storage
        vq = self.quantizer.quantize(v.transpose(0, 1), layer, "v").transpose(0, 1)
        blocks, rows = slot_mapping // self.block_size, slot_mapping % self.block_size
        self.k[layer][blocks, :, rows] = kq  # advanced indices on dims 0 and 2: (N, H_kv, D)
        self.v[layer][blocks, :, rows] = vq

    def decode_attention(
        self,
        layer: int,
        q: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        softmax_scale: float,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """q (B, H, D), one token per sequence, over the first lengths[b] tokens of block_tables[b] -> (B, H, D).

        Dequantization happens inside the attention arithmetic; no full-precision copy of the cache is made.
        """
        ks, kz = self.quantizer.affine(layer, "k")
        vs, vz = self.quantizer.affine(layer, "v")
        if self.kernels is None:
            from runtime.cpu_attention import decode_attention

            return decode_attention(
                q, self.k[layer], self.v[layer], block_tables, lengths, ks, kz, vs, vz, softmax_scale
            )
        return self.kernels.decode_attention(
            q.contiguous(),
            self.k[layer],
            self.v[layer],
            block_tables,
            lengths,
            ks,
            kz,
            vs,
            vz,
            self.quantizer.kv_dtype,
            softmax_scale,
            max_length=int(lengths.max()) if max_length is None else max_length,
        )

    def read(
        self, layer: int, block_tables: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K, V `(B, H_kv, length, D)` of the first `length` positions of each block table
        (prefill only; positions past a sequence's own length hold other data and must be masked)."""
        n = -(-length // self.block_size)
        bt = block_tables[:, :n].to(self.k[layer].device)  # (B, n)
        out = []
        for which, pool in (("k", self.k[layer]), ("v", self.v[layer])):
            x = pool[bt]  # (B, n, H_kv, bs, D)
            x = x.transpose(1, 2).flatten(2, 3)[:, :, :length]  # (B, H_kv, length, D)
            out.append(self.quantizer.dequantize(x, layer, which, dtype))
        return out[0], out[1]
