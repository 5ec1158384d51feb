"""The KV cache: preallocated per-layer K and V in their storage dtype, quantize on write, dequantize on read.

Layout (shared with the CUDA kernels): per layer, K and V are `(B_slots, H_kv, S, D)` contiguous, indexed
[slot, kv_head, position, channel], in torch.float16 | torch.int8 | torch.float8_e4m3fn | torch.float8_e5m2.
K is stored after RoPE in TurboMind's interleaved channel order.

Every format-specific step goes through one `KVQuantizer` (quantize / dequantize / the per-head affine
map x^ = scale * q + zp used by the fused attention). The formulas live in `runtime.quant`:
    int8:  q = clamp(round_half_even((x - zp) / scale), -128, 127);   x^ = q * scale + zp
    fp8:   f = cast(clamp(x / scale, +-fp8_max));                      x^ = f * scale
    fp16:  plain cast (scale 1, zp 0)
Parameters come from the workspace files (`runtime.kv_params`) or, for FP8 with calculate_kv_scales,
from the first prompt's per-layer amax with headroom (later, larger values saturate).
A later online mode (scale/zp computed per token and stored beside it) implements the same protocol
and keeps its side tensors inside the quantizer; the model only calls `KVCache.write` and the attention.
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


class KVCache:
    """Per-layer K/V `(B_slots, H_kv, S, D)` in the quantizer's storage dtype."""

    def __init__(
        self,
        num_layer: int,
        num_slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        quantizer: KVQuantizer,
        device: str | torch.device = "cpu",
        kernels=None,
    ) -> None:
        # kernels: a module with kv_cache_write / decode_attention over this layout (runtime.cuda on a GPU;
        # runtime.cuda.host_ops runs the same kernels on the CPU in tests); None = the PyTorch path.
        self.kernels = kernels
        self.quantizer = quantizer
        self.shape = (num_slots, kv_heads, max_len, head_dim)
        dt = quantizer.storage_dtype
        self.k = [torch.zeros(self.shape, dtype=dt, device=device) for _ in range(num_layer)]
        self.v = [torch.zeros(self.shape, dtype=dt, device=device) for _ in range(num_layer)]

    @property
    def max_len(self) -> int:
        return self.shape[2]

    def nbytes(self) -> int:
        data = sum(t.numel() * t.element_size() for t in self.k + self.v)
        side = getattr(self.quantizer, "param_bytes", lambda: 0)()
        return data + side

    def write(
        self, layer: int, slots: torch.Tensor, starts: torch.Tensor, counts: list[int], k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store k, v `(B, H_kv, T, D)`: sequence b's first counts[b] tokens at positions starts[b]... of slots[b]."""
        self.quantizer.observe(layer, k, v)
        if self.kernels is not None:
            self._kernel_write(layer, slots, starts, counts, k, v)
            return
        kq = self.quantizer.quantize(k, layer, "k")  # (B, H_kv, T, D) storage dtype
        vq = self.quantizer.quantize(v, layer, "v")
        if k.shape[2] == 1:  # decode: one token per sequence, one indexed store
            self.k[layer][slots, :, starts] = kq[:, :, 0]
            self.v[layer][slots, :, starts] = vq[:, :, 0]
            return
        for b, n in enumerate(counts):
            s, p = int(slots[b]), int(starts[b])
            self.k[layer][s, :, p : p + n] = kq[b, :, :n]
            self.v[layer][s, :, p : p + n] = vq[b, :, :n]

    def _kernel_write(self, layer: int, slots, starts, counts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Flatten the valid tokens to (N, H_kv, D) with their (slot, position) and let the kernel quantize them."""
        B, _, T, _ = k.shape
        dev = k.device
        t = torch.arange(T, device=dev).view(1, T)
        valid = t < torch.tensor(counts, device=dev).view(B, 1)  # (B, T)
        slot_ids = slots.to(dev).view(B, 1).expand(B, T)[valid]  # (N,)
        positions = (starts.to(dev).view(B, 1) + t)[valid]  # (N,)
        k_new = k.transpose(1, 2)[valid].contiguous()  # (N, H_kv, D)
        v_new = v.transpose(1, 2)[valid].contiguous()
        ks, kz = self.quantizer.affine(layer, "k")
        vs, vz = self.quantizer.affine(layer, "v")
        self.kernels.kv_cache_write(
            self.k[layer], self.v[layer], k_new, v_new, slot_ids, positions, ks, kz, vs, vz, self.quantizer.kv_dtype
        )

    def decode_attention(
        self, layer: int, q: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, softmax_scale: float
    ) -> torch.Tensor:
        """q (B, H, D), one token per sequence, over the first lengths[b] cached tokens of slots[b] -> (B, H, D).

        Dequantization happens inside the attention arithmetic; no full-precision copy of the cache is made.
        """
        ks, kz = self.quantizer.affine(layer, "k")
        vs, vz = self.quantizer.affine(layer, "v")
        if self.kernels is None:
            from runtime.cpu_attention import decode_attention

            return decode_attention(q, self.k[layer], self.v[layer], slots, lengths, ks, kz, vs, vz, softmax_scale)
        dev = q.device
        return self.kernels.decode_attention(
            q.contiguous(),
            self.k[layer],
            self.v[layer],
            slots.to(dev),
            lengths.to(dev),
            ks,
            kz,
            vs,
            vz,
            self.quantizer.kv_dtype,
            softmax_scale,
            max_length=int(lengths.max()),
        )

    def read(
        self, layer: int, slots: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K, V `(B, H_kv, length, D)` of the first `length` positions (prefill only)."""
        k = self.quantizer.dequantize(self.k[layer][slots, :, :length], layer, "k", dtype)
        v = self.quantizer.dequantize(self.v[layer][slots, :, :length], layer, "v", dtype)
        return k, v
