"""The KV cache: a pool of fixed-size blocks per layer in the storage dtype; quantize on write, dequantize on read.

Layout (shared with the C++ and CUDA kernels): per layer, K and V pools are `(num_blocks, H_kv, block_size, D)`
contiguous, in torch.float16 | torch.int8 | torch.float8_e4m3fn | torch.float8_e5m2. A sequence owns a list
of blocks (its block table): token t lives in block `block_table[t // block_size]`, row `t % block_size`.
Writes address the pool through a slot mapping, slot = block * block_size + row. K is stored after RoPE
in TurboMind's interleaved channel order. Which blocks belong to whom is `runtime.scheduler`'s business.

Every format-specific step goes through one `KVQuantizer`. The formulas live in `runtime.quant`.
Static modes (`StaticQuantizer`: quantize / dequantize / the per-head affine map x^ = scale * q + zp used by
the fused attention):
    int8:  q = clamp(round_half_even((x - zp) / scale), -128, 127);   x^ = q * scale + zp
    fp8:   f = cast(clamp(x / scale, +-fp8_max));                      x^ = f * scale
    fp16:  plain cast (scale 1, zp 0)
Their parameters come from the workspace files (`runtime.kv_params`) or, for FP8 with calculate_kv_scales,
from the first prompt's per-layer amax with headroom (later, larger values saturate). They are per
layer and KV head, not per block: 16 bytes per (layer, KV head) outside the pool.

Online modes (`OnlineQuantizer`: int8_per_token_head, fp8_per_token_head, int4_per_token_head) compute each
row's (scale, zero) when it is written and keep them inside the block, in parameter pools beside the data:
    data   k[layer], v[layer]              (num_blocks, H_kv, block_size, D)  uint8 | float8_e4m3fn
                                           (num_blocks, H_kv, block_size, D / 2) uint8 for int4 (packed)
    params k_param[layer], v_param[layer]  (num_blocks, H_kv, block_size, 2)  float16 (scale, zero)
Same block ids and rows for both, so a block's parameters travel with it and `block_bytes` counts them.
int4_per_token_head stores its keys per channel within a block (`quant.quantize_channels`): its K param pool is
    k_param[layer]                         (num_blocks, H_kv, 2, D)           float16 (scale row, zero row)
filled when the block's last row is written; until then the block is open and its key rows are int8 per-row
rows in the half-block layout (`open_key_rows`), the second half in the helper block (the next entry of the
sequence's block table, which the scheduler keeps while a block is open). A step's writes say which rows
stay open and which blocks they complete (`KeyPlan`, built once per step beside the slot mapping).
With a rotation R (orthonormal Hadamard, `quant.hadamard`) rows are stored as x @ R: q is rotated the same
way before attention (q R . k R = q . k) and the attention output, a mix of rotated V rows, is un-rotated
by @ R.T; the prefill read-back un-rotates K and V.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import torch

from runtime import cpu_write, hugepages, quant


class KVQuantizer(Protocol):
    """The one place a cache format differs: how values are stored and read back.

    `online` False: StaticQuantizer's quantize / dequantize / affine (per-layer, per-head parameters);
    `online` True: OnlineQuantizer's per-row quantize / dequantize (parameters stored in the blocks).
    """

    kv_dtype: str  # fp16 | int8 | fp8_e4m3 | fp8_e5m2 | int8_per_token_head | fp8_per_token_head | int4_per_token_head
    storage_dtype: torch.dtype
    online: bool

    def row_bytes(self, head_dim: int, block_size: int) -> float: ...
    def param_bytes(self) -> int: ...
    def observe(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...


class StaticQuantizer:
    """Per-head (H_kv,) fp32 scale/zp per layer, fixed at load (or set once from the first prompt).

    k_scale, k_zp, v_scale, v_zp: (num_layer, H_kv) fp32. fp16 uses scale 1, zp 0 (never applied).
    `dynamic=True` (FP8 calculate_kv_scales): the first `observe` of each layer sets its scales from
    amax over all heads of that prompt via `quant.dynamic_fp8_scale`.
    """

    online = False

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

    def row_bytes(self, head_dim: int, block_size: int) -> float:
        return quant.kv_row_bytes(self.kv_dtype, head_dim)

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


# Rotation per online mode when kv_rotation is auto, measured with lite.eval on the README's evaluation text
# (docs/formats.md §3a): it lowers the mean KL to fp16 in every mode (INT8 3.9e-4 -> 1.6e-4, FP8 5.4e-3 ->
# 4.2e-3, INT4 0.120 -> 0.048), so it is on for all three.
DEFAULT_ROTATION = {"int8_per_token_head": True, "fp8_per_token_head": True, "int4_per_token_head": True}
ROTATION_SEED = 0  # fixed: the same R for every run, layer and head


def rotation_for(kv_dtype: str, head_dim: int, setting: str = "auto") -> torch.Tensor | None:
    """R (D, D) fp32 for an online mode, or None. setting: auto (DEFAULT_ROTATION) | on | off; auto leaves a
    head size that is not a power of two unrotated, on refuses it."""
    on = DEFAULT_ROTATION[kv_dtype] if setting == "auto" else setting == "on"
    power_of_two = head_dim > 0 and not head_dim & (head_dim - 1)
    if setting == "on" and not power_of_two:
        raise ValueError(
            f"kv_rotation = on needs a power-of-two head size for the Hadamard rotation; config.ini size_per_head "
            f"is {head_dim}: use kv_rotation auto or off (--kv-rotation)"
        )
    if not on or not power_of_two:
        return None
    return quant.hadamard(head_dim, ROTATION_SEED)


class OnlineQuantizer:
    """Per-row (scale, zero) computed at write time (`quant.quantize_online`); nothing held per layer.

    rotation: None, or R (D, D) fp32 orthonormal (`quant.hadamard`): rows are stored as x @ R.
    """

    online = True

    def __init__(self, kv_dtype: str, rotation: torch.Tensor | None = None, device="cpu") -> None:
        if not quant.is_online(kv_dtype):
            raise ValueError(f"OnlineQuantizer takes one of {', '.join(quant.ONLINE_MODES)}; got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        self.storage_dtype = quant.ONLINE_STORAGE[kv_dtype]
        self.rotation = None if rotation is None else rotation.to(device=device, dtype=torch.float32)

    def row_bytes(self, head_dim: int, block_size: int) -> float:
        return quant.online_row_bytes(self.kv_dtype, head_dim, block_size)

    def param_bytes(self) -> int:
        return 0  # the parameters live in the blocks

    def observe(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pass

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> x @ R in x's dtype (identity without a rotation); used for K, V and q."""
        if self.rotation is None:
            return x
        return (x.to(torch.float32) @ self.rotation).to(x.dtype)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> x @ R.T: back from the rotated basis (attention outputs, read-back K and V)."""
        if self.rotation is None:
            return x
        return (x.to(torch.float32) @ self.rotation.T).to(x.dtype)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., D) -> (data (..., D or D / 2) storage dtype, params (..., 2) fp16), rotated first (in fp32)."""
        return quant.quantize_online(self.rotate(x.to(torch.float32)), self.kv_dtype)

    def dequantize(self, data: torch.Tensor, params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored rows -> x^ (..., D) in `dtype`, un-rotated."""
        return self.unrotate(quant.dequantize_online(data, params, self.kv_dtype)).to(dtype)


class KeyPlan(NamedTuple):
    """Where a step's key rows go in a per-channel-key mode (int4_per_token_head), built by `key_plan`.

    helper (N,) long: for each written row, its block's helper block id (open rows go to the half-block layout
        of their block and this helper), or -1 where this step completes the row's block;
    complete (M, 4) long: one (block, helper or -1, r0, i0) per block this step completes: its rows [0, r0)
        are open rows written by earlier steps, rows [r0, block_size) are the step's rows i0, i0 + 1, ...
    """

    helper: torch.Tensor
    complete: torch.Tensor


def key_plan(block_ids: list[list[int]], starts: list[int], counts: list[int], block_size: int) -> KeyPlan:
    """The KeyPlan of a step in which sequence b (blocks block_ids[b]) writes positions starts[b] + [0, counts[b])."""
    helper, complete, i = [], [], 0
    for ids, start, n in zip(block_ids, starts, counts, strict=True):
        end = start + n
        for t in range(start, end):
            j, r = divmod(t, block_size)
            nxt = ids[j + 1] if j + 1 < len(ids) else -1
            if (j + 1) * block_size <= end:  # this step writes the block's last row
                helper.append(-1)
                if r == 0 or t == start:
                    complete.append((ids[j], nxt, r, i))
            else:
                if nxt < 0:
                    raise ValueError(f"position {t} opens block {ids[j]} without a helper block after it in {ids}")
                helper.append(nxt)
            i += 1
    return KeyPlan(torch.tensor(helper, dtype=torch.long), torch.tensor(complete, dtype=torch.long).view(-1, 4))


def open_key_rows(pool: torch.Tensor, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The half-block views of a per-channel-key K pool (num_blocks, H_kv, bs, D / 2) and its params
    (num_blocks, H_kv, 2, D): open rows (num_blocks, H_kv, bs / 2, D) uint8 codes and (num_blocks, H_kv, D, 2)
    fp16 (scale, zero) of which rows [0, bs / 2) are used (`open_row_home` says which block and row)."""
    nb, hkv, bs, width = pool.shape
    return pool.view(nb, hkv, bs // 2, 2 * width), param.view(nb, hkv, param.shape[-1], 2)


def open_row_home(
    block: torch.Tensor, helper: torch.Tensor, row: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where open key row `row` of `block` (helper block `helper`) lives in the `open_key_rows` views: the block
    itself for row < bs / 2, else its helper; at row % (bs / 2). Arguments broadcast."""
    half = block_size // 2
    return torch.where(row < half, block, helper), row % half


def read_open_rows(
    pool: torch.Tensor, param: torch.Tensor, block: torch.Tensor, helper: torch.Tensor, row: torch.Tensor
) -> torch.Tensor:
    """Open key rows `row` of blocks `block` with helpers `helper` (broadcasting to some shape S), read back as
    int8_per_token_head rows: (*S, H_kv, D) fp32 = code * scale + zero."""
    page, r = open_row_home(block, helper, row, pool.shape[2])
    rows8, par8 = open_key_rows(pool, param)
    return quant.dequantize_online(rows8[page, :, r], par8[page, :, r], "int8_per_token_head")


def gather_channel_keys(
    pool: torch.Tensor, param: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Keys of positions pos (n, c) < lengths (n,) of sequences with block_tables (n, max_blocks), read back from
    a per-channel-key pool -> (n, c, H_kv, D) fp32 (rotated basis). Positions in the full blocks
    (pos < lengths // bs * bs) read their block's per-channel codes, the rest the open rows."""
    bs = pool.shape[2]
    col, row = pos // bs, pos % bs
    page = block_tables.gather(1, col)  # (n, c)
    full = quant.dequantize_channels(pool[page, :, row].unsqueeze(-2), param[page]).squeeze(-2)  # (n, c, H_kv, D)
    is_open = pos >= (lengths // bs * bs).view(-1, 1)
    if not bool(is_open.any()):
        return full
    helper = block_tables.gather(1, (col + 1).clamp(max=block_tables.shape[1] - 1))
    helper = torch.where(is_open, helper, page)  # full positions: never a padding entry of the table, not used
    opened = read_open_rows(pool, param, page, helper, row)
    return torch.where(is_open[..., None, None], opened, full)


def block_bytes(num_layer: int, kv_heads: int, block_size: int, row_bytes: float) -> int:
    """Bytes of one block across all layers, K and V; row_bytes (`KVQuantizer.row_bytes`) counts an online
    mode's per-row parameters, which live in the block."""
    return round(2 * num_layer * kv_heads * block_size * row_bytes)


class KVCache:
    """Per-layer K/V block pools `(num_blocks, H_kv, block_size, D)` in the quantizer's storage dtype (online modes:
    plus `(num_blocks, H_kv, block_size, 2)` fp16 parameter pools; D / 2 data bytes per row for INT4)."""

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
        self.fast_write = True  # False: the PyTorch write even where runtime.cpu_write takes the mode (tests)
        self._plans: dict = {}  # (layer, query heads) -> runtime.cpu_attention.DecodePlan (`_cpu_plan`)
        self.quantizer = quantizer
        self.num_blocks, self.block_size, self.head_dim = num_blocks, block_size, head_dim
        self.shape = (num_blocks, kv_heads, block_size, quant.row_width(quantizer.kv_dtype, head_dim))
        dt = quantizer.storage_dtype
        pshape = (num_blocks, kv_heads, block_size, 2)  # (scale, zero) per row
        self.channel_keys = quant.channel_keys(quantizer.kv_dtype)
        kshape = (num_blocks, kv_heads, 2, head_dim) if self.channel_keys else pshape  # (scale, zero) per channel
        if self.channel_keys and not quant.channel_block_fits(block_size, head_dim):
            raise ValueError(
                f"{quantizer.kv_dtype} needs an even block_size of at most 2 * size_per_head = {2 * head_dim} "
                f"(its open key rows use half a block each); got block_size {block_size}"
            )
        layers, params = range(num_layer), range(num_layer) if quantizer.online else ()
        # zeros, not empty: a never-written row must be finite in case a reader's mask lets 0 * x through. On the
        # CPU all pools share one arena on huge pages (runtime.hugepages: zero-filled, resident where written).
        zeros = functools.partial(torch.zeros, device=device)
        if torch.device(device).type == "cpu":
            pools = 2 * len(layers) * hugepages.nbytes(self.shape, dt)
            pools += len(params) * (
                hugepages.nbytes(kshape, quant.PARAM_DTYPE) + hugepages.nbytes(pshape, quant.PARAM_DTYPE)
            )
            zeros = hugepages.Arena(pools).take
        self.k = [zeros(self.shape, dtype=dt) for _ in layers]
        self.v = [zeros(self.shape, dtype=dt) for _ in layers]
        self.k_param = [zeros(kshape, dtype=quant.PARAM_DTYPE) for _ in params]
        self.v_param = [zeros(pshape, dtype=quant.PARAM_DTYPE) for _ in params]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def pools(self) -> list[torch.Tensor]:
        """Every tensor of the pool: K and V per layer, then the online modes' K and V parameter pools per layer."""
        return self.k + self.v + self.k_param + self.v_param

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pools()) + self.quantizer.param_bytes()

    def _params(self, layer: int) -> dict:
        """Keyword arguments naming this layer's parameter pools (online modes; empty otherwise)."""
        if not self.quantizer.online:
            return {}
        return {"k_param": self.k_param[layer], "v_param": self.v_param[layer]}

    def _affine(self, layer: int) -> tuple:
        """(k_scale, k_zp, v_scale, v_zp) per head for static modes; four None for online ones."""
        if self.quantizer.online:
            return None, None, None, None
        return (*self.quantizer.affine(layer, "k"), *self.quantizer.affine(layer, "v"))

    def write(
        self,
        layer: int,
        slot_mapping: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_plan: KeyPlan | None = None,
    ) -> None:
        """Store k, v `(N, H_kv, D)` (the step's valid tokens) at slot_mapping (N,) = block * block_size + row.
        key_plan: required by a per-channel-key mode (int4_per_token_head), ignored otherwise."""
        qz = self.quantizer
        qz.observe(layer, k, v)
        if self.channel_keys and key_plan is None:
            raise ValueError(f"{qz.kv_dtype} writes need the step's key_plan (runtime.kv_cache.key_plan)")
        if self.kernels is not None:
            plan = {"k_helper": key_plan.helper, "k_complete": key_plan.complete} if self.channel_keys else {}
            if qz.online:  # the kernels see rotated rows, fp32 as the PyTorch write rotates them; never inside them
                k, v = qz.rotate(k.to(torch.float32)), qz.rotate(v.to(torch.float32))
            self.kernels.kv_cache_write(
                self.k[layer],
                self.v[layer],
                k.contiguous(),
                v.contiguous(),
                slot_mapping,
                *self._affine(layer),
                qz.kv_dtype,
                **self._params(layer),
                **plan,
            )
            return
        if qz.online and self.fast_write and cpu_write.takes(qz.kv_dtype, k):  # C++, same bytes as below
            kr, vr = qz.rotate(k.to(torch.float32)), qz.rotate(v.to(torch.float32))
            cpu_write.online_write(
                kr,
                vr,
                slot_mapping,
                qz.kv_dtype,
                self.k[layer],
                self.v[layer],
                self.k_param[layer],
                self.v_param[layer],
                key_plan,
            )
            return
        if not qz.online and self.fast_write and cpu_write.takes_static(qz.kv_dtype, k):  # C++, same bytes
            cpu_write.static_write(k, v, slot_mapping, qz.kv_dtype, self.k[layer], self.v[layer], *self._affine(layer))
            return
        blocks, rows = slot_mapping // self.block_size, slot_mapping % self.block_size
        if qz.online:
            pairs = (
                ((v, self.v, self.v_param),)
                if self.channel_keys
                else ((k, self.k, self.k_param), (v, self.v, self.v_param))
            )
            for x, data, param in pairs:
                q, p = qz.quantize(x)  # (N, H_kv, D or D / 2), (N, H_kv, 2)
                data[layer][blocks, :, rows] = q
                param[layer][blocks, :, rows] = p
            if self.channel_keys:
                self._write_channel_keys(layer, blocks, rows, qz.rotate(k.to(torch.float32)), key_plan)
            return
        kq = qz.quantize(k.transpose(0, 1), layer, "k").transpose(0, 1)  # (N, H_kv, D) storage
        vq = qz.quantize(v.transpose(0, 1), layer, "v").transpose(0, 1)
        self.k[layer][blocks, :, rows] = kq  # advanced indices on dims 0 and 2: (N, H_kv, D)
        self.v[layer][blocks, :, rows] = vq

    def _write_channel_keys(
        self, layer: int, blocks: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, plan: KeyPlan
    ) -> None:
        """The PyTorch definition of a per-channel-key write (the kernels follow it): rotated k (N, H_kv, D) fp32
        at rows (N,) of blocks (N,). Each block the plan completes is read back (earlier open rows, then this step's
        rows through int8) and quantized per channel; then the rows whose block stays open become int8 open rows
        (in that order: a block opened by this step may be the helper of one it completes)."""
        codes, params = quant.quantize_online(k, "int8_per_token_head")  # (N, H_kv, D), (N, H_kv, 2)
        complete = plan.complete.to(k.device)
        if complete.numel():  # first: this step may open a block in a completed block's helper
            self._complete_key_blocks(layer, codes, params, complete)
        helper = plan.helper.to(k.device)
        stay = helper >= 0
        if bool(stay.any()):
            rows8, par8 = open_key_rows(self.k[layer], self.k_param[layer])
            page, orow = open_row_home(blocks[stay], helper[stay], rows[stay], self.block_size)
            rows8[page, :, orow] = codes[stay]
            par8[page, :, orow] = params[stay]

    def _complete_key_blocks(
        self, layer: int, codes: torch.Tensor, params: torch.Tensor, complete: torch.Tensor
    ) -> None:
        """Quantize per channel the blocks complete (M, 4) names, from their earlier open rows and this step's int8
        rows (codes, params)."""
        blk, nxt, r0, i0 = complete.unbind(1)  # (M,) each
        r = torch.arange(self.block_size, device=codes.device).view(1, -1)
        new = r >= r0.view(-1, 1)  # (M, bs): this step's rows
        src = (i0.view(-1, 1) + r - r0.view(-1, 1)).clamp(0, codes.shape[0] - 1)
        fresh = quant.dequantize_online(codes[src], params[src], "int8_per_token_head")  # (M, bs, H_kv, D)
        # helper -1 (none) only where every row past the first half is this step's: any valid block, not used
        earlier = read_open_rows(self.k[layer], self.k_param[layer], blk.view(-1, 1), nxt.view(-1, 1).clamp(min=0), r)
        x = torch.where(new[..., None, None], fresh, earlier).transpose(1, 2)  # (M, H_kv, bs, D)
        data, cparams = quant.quantize_channels(x)  # all blocks read before any is stored: one may be another's helper
        self.k[layer][blk] = data
        self.k_param[layer][blk] = cparams

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
        Online modes with a rotation: q is rotated here and the output un-rotated (o @ R.T).
        """
        qz = self.quantizer
        if qz.online:
            q = qz.rotate(q)
        args = (q.contiguous(), self.k[layer], self.v[layer], block_tables, lengths, *self._affine(layer))
        if self.kernels is None:
            plan = self._cpu_plan(layer, q)
            if plan is not None:
                o = plan(args[0], block_tables, lengths, softmax_scale)
            else:
                from runtime.cpu_attention import decode_attention

                o = decode_attention(*args, softmax_scale, kv_dtype=qz.kv_dtype, **self._params(layer))
        else:
            o = self.kernels.decode_attention(
                *args,
                qz.kv_dtype,
                softmax_scale,
                max_length=int(lengths.max()) if max_length is None else max_length,
                **self._params(layer),
            )
        return qz.unrotate(o) if qz.online else o

    def _cpu_plan(self, layer: int, q: torch.Tensor):
        """The C++ decode kernel bound to this layer's pools (runtime.cpu_attention.DecodePlan, made at the first
        decode step), or None where it does not take them (then the torch reference runs)."""
        from runtime.cpu_attention import DecodePlan, cpp_usable

        key = (layer, q.shape[1])
        plan = self._plans.get(key)
        if plan is None or plan.k_pool is not self.k[layer] or plan.v_pool is not self.v[layer]:
            if q.is_cuda or not cpp_usable(q, self.k[layer], self.quantizer.kv_dtype):
                return None
            kw = self._params(layer)
            plan = DecodePlan(
                self.k[layer],
                self.v[layer],
                self._affine(layer),
                self.quantizer.kv_dtype,
                heads=q.shape[1],
                head_dim=self.head_dim,
                **kw,
            )
            if not plan.copied:  # it reads the parameters where the quantizer keeps them (set in place)
                self._plans[key] = plan
        return plan

    def open_history(self, layer: int, block_ids: list[int], start: int, dtype: torch.dtype) -> torch.Tensor:
        """Per-channel keys: a sequence's open-block rows [start // bs * bs, start) as int8 rows, un-rotated
        (H_kv, start % bs, D), read before a write that may complete the block (`open_keys`)."""
        device = self.k[layer].device
        table = torch.tensor([block_ids], dtype=torch.long, device=device)
        pos = torch.arange(start - start % self.block_size, start, device=device).view(1, -1)
        x = gather_channel_keys(self.k[layer], self.k_param[layer], table, torch.tensor([start], device=device), pos)
        return self.quantizer.unrotate(x[0].transpose(0, 1)).to(dtype)  # at length `start` all these rows are open

    def open_keys(self, k: torch.Tensor) -> torch.Tensor:
        """Per-channel keys: k (..., D) as open rows hold them (int8 read-back in the rotated basis), un-rotated."""
        qz = self.quantizer
        return qz.unrotate(quant.int8_round_trip(qz.rotate(k.to(torch.float32)))).to(k.dtype)

    def read(
        self, layer: int, block_tables: torch.Tensor, length: int, dtype: torch.dtype, cached: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K, V `(B, H_kv, length, D)` of the first `length` positions of each block table
        (prefill only; positions past a sequence's own length hold other data and must be masked). cached: the
        tokens each sequence has in the cache (default `length`), which tells a per-channel-key mode's full
        blocks from its open one."""
        n = -(-length // self.block_size)
        bt = block_tables[:, :n].to(self.k[layer].device)  # (B, n)

        def gather(pool: torch.Tensor) -> torch.Tensor:
            x = pool[bt]  # (B, n, H_kv, bs, width)
            return x.transpose(1, 2).flatten(2, 3)[:, :, :length]  # (B, H_kv, length, width)

        qz = self.quantizer
        if self.channel_keys:
            tables = block_tables.to(device=bt.device, dtype=torch.long)
            B = tables.shape[0]
            pos = torch.arange(length, device=bt.device).expand(B, length)
            full = torch.full((B,), length if cached is None else cached, dtype=torch.long, device=bt.device)
            keys = gather_channel_keys(self.k[layer], self.k_param[layer], tables, full, pos)  # (B, length, H_kv, D)
            k = qz.unrotate(keys.transpose(1, 2)).to(dtype)
            v = qz.dequantize(gather(self.v[layer]), gather(self.v_param[layer]), dtype)
            return k, v
        if qz.online:
            k = qz.dequantize(gather(self.k[layer]), gather(self.k_param[layer]), dtype)
            v = qz.dequantize(gather(self.v[layer]), gather(self.v_param[layer]), dtype)
            return k, v
        return (
            qz.dequantize(gather(self.k[layer]), layer, "k", dtype),
            qz.dequantize(gather(self.v[layer]), layer, "v", dtype),
        )
