"""LLaMA-family forward pass on the TurboMind workspace layout (fused QKV, interleaved RoPE, GQA).

Per layer (x: (B, T, hidden); H query heads, H_kv KV heads, head size D):
    h    = RMSNorm(x) = x * rsqrt(mean(x^2) + eps) * w        (variance in fp32)
    qkv  = h @ W_qkv + b                                        W_qkv (hidden, (H + 2 H_kv) D) = [Q | K | V]
    q, k = RoPE(q), RoPE(k)     interleaved pairs (2i, 2i+1) rotated by pos * theta^(-2i/D)
    attn = softmax(q k^T / sqrt(D)) v  over the session's cache (see `attention`)
    x    = x + attn @ W_o + b_o
    x    = x + (silu(h2 @ W1) * (h2 @ W3)) @ W2                h2 = RMSNorm(x)
deploy permuted the q/k output channels into interleaved pair order, so the interleaved rotation
reproduces HF's rotate_half exactly (attention scores are invariant to a shared channel permutation).

Prefill attention (`use_context_fmha`):
    1: fused SDPA over the chunk's unquantized K/V plus, when the session has history, the
       dequantized cached history (KV quantization only affects later tokens),
    0: the chunk's K/V is written first and attention reads the whole prefix back from the cache
       (upstream INT8 semantics: quantization error already shows in the prefill logits).
Decode always reads the cache, through `KVCache.decode_attention` (the C++ kernel of `runtime.cpu_attention` bound
to each layer's pools, or the torch reference; dequantization
folded into the attention arithmetic).

The weight matrices are held transposed, (out, in) as nn.Linear, and applied by `runtime.cpu_linear.linear`:
a bandwidth-bound bf16 kernel for the few rows of a CPU decode step, PyTorch's GEMM otherwise. With fp32 compute
on a CPU (no native bf16) they stay in the workspace's fp16, packed as `runtime.cpu_f16w.Panels` (that kernel's
layout: panels of 16 rows, k outermost), and that kernel multiplies them in fp32. On
the CPU they live on huge pages (`runtime.hugepages`), and a decode step those kernels take runs as one C++ call
(`runtime.cpu_step.DecodeGraph`, one per KV cache: the layer loop of `forward` over the same kernels).

Tensor parallelism (`tp`, a `runtime.distributed.TPGroup`; None in one process): the weights are one rank's
(`workspace.read_rank`): H / N query heads, H_kv / N KV heads, 1/N of the FFN columns and of the vocabulary
rows. x stays replicated: each rank's `o @ W_o` and FFN output are partial sums, all-reduced (two per layer),
and so is the embedding lookup (each token's row lives on one rank, the others add zeros). Each rank computes
the logits of its vocabulary slice; rank 0 gathers them and the other ranks' forward returns None.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from runtime import cpu_f16w, hugepages
from runtime.cpu_linear import add_rms_norm, linear, rms_norm, rope_qk, swiglu_linear
from runtime.cpu_step import MATRICES, DecodeGraph
from runtime.kv_cache import KeyPlan, KVCache, key_plan
from runtime.workspace import WorkspaceConfig, hidden_size, release_pages

if TYPE_CHECKING:
    from runtime.distributed import TPGroup

# the workspace files of a layer's weight matrices (in, out), in MATRICES' order; side by side where one matmul
# applies them (w1 and w3: gate and up)
_MATRIX_FILES = (
    ("attention.w_qkv.weight",),
    ("attention.wo.weight",),
    ("feed_forward.w1.weight", "feed_forward.w3.weight"),
    ("feed_forward.w2.weight",),
)


@dataclass
class Batch:
    """Where a forward step's tokens go: sequence b of the (B, T) token block already has starts[b] tokens
    cached, contributes its first counts[b] tokens (the rest is padding) and owns the pool blocks
    block_tables[b] (padded with any valid block id). slot_mapping lists the pool slot of every valid
    token, sequence by sequence: slot = block * block_size + row."""

    block_tables: torch.Tensor  # (B, max_blocks) int32, on the cache's device (the kernels take int32)
    starts: torch.Tensor  # (B,) long, on the CPU (masks and positions)
    counts: list[int]
    slot_mapping: torch.Tensor  # (sum(counts),) long, on the cache's device
    lengths: torch.Tensor  # (B,) int32 = starts + counts: tokens in the cache after this step, on the device
    max_length: int  # max(lengths), known on the host (no device sync per layer)
    key_plan: KeyPlan | None = None  # per-channel-key modes (int4_per_token_head): open rows and completed blocks
    block_ids: list[list[int]] | None = None  # per-channel-key modes: each sequence's blocks (open rows by them)

    @classmethod
    def build(
        cls,
        block_ids: list[list[int]],
        starts: list[int],
        counts: list[int],
        block_size: int,
        device="cpu",
        channel_keys: bool = False,
    ) -> Batch:
        """Tables and slot mapping (and with channel_keys the key plan) built once per step (not per layer),
        moved to the device once."""
        width = max(len(b) for b in block_ids)
        tables = torch.zeros(len(block_ids), width, dtype=torch.long)
        slots = []
        for b, (ids, start, n) in enumerate(zip(block_ids, starts, counts, strict=True)):
            tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            pos = torch.arange(start, start + n)
            slots.append(tables[b, pos // block_size] * block_size + pos % block_size)
        lengths = torch.tensor([s + n for s, n in zip(starts, counts, strict=True)], dtype=torch.int32)
        return cls(
            tables.to(device=device, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.long),
            list(counts),
            torch.cat(slots).to(device),
            lengths.to(device),
            int(lengths.max()),
            KeyPlan(*(t.to(device) for t in key_plan(block_ids, starts, counts, block_size))) if channel_keys else None,
            [list(ids) for ids in block_ids] if channel_keys else None,
        )


def as_decode_sees(cache: KVCache, history: torch.Tensor, kb, vb, chunk_keys, start: int, mask: torch.Tensor):
    """Per-channel keys, prefill without context FMHA: make query t of a chunk see the keys as the decode step at
    position t would. There, the block holding t is still open unless t is its last row, so its keys are int8 rows;
    the cache after this chunk's write holds per-channel codes for every block the chunk completed.

    history (H_kv, start % bs, D): the open block's earlier rows from before the write; chunk_keys (1, H_kv, n, D)
    this chunk's keys; kb, vb (1, H_kv, start + n, D) the cache read back after the write; mask (n, start + n).
    Returns keys and values with the open rows of the chunk's first block on appended (1, H_kv, start + n + m, D),
    and a mask that gives each query exactly one version of each key."""
    bs = cache.block_size
    first = start - start % bs  # the first position whose block this chunk can complete
    opened = torch.cat([history.unsqueeze(0), cache.open_keys(chunk_keys)], dim=2)  # (1, H_kv, m, D): [first, end)
    n, end = mask.shape[0], mask.shape[1]
    t = start + torch.arange(n, device=mask.device).view(-1, 1)  # query positions
    p = torch.arange(first, end, device=mask.device).view(1, -1)  # positions of the open versions
    as_open = (p // bs == t // bs) & ((t + 1) % bs != 0) & (p <= t)  # (n, m): t's own block, not yet complete
    mask = mask.clone()
    mask[:, first:] &= ~as_open
    return (
        torch.cat([kb, opened.to(kb.dtype)], dim=2),
        torch.cat([vb, vb[:, :, first:]], dim=2),
        torch.cat([mask, as_open], dim=1),
    )


class Transformer:
    """Holds the weights (compute dtype, on device) and runs prefill/decode steps against a KVCache."""

    def __init__(
        self,
        cfg: WorkspaceConfig,
        weights: dict,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_len: int | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        if cfg.use_dynamic_ntk:
            raise NotImplementedError(
                "config.ini use_dynamic_ntk = 1 is not implemented by this runtime; "
                "set it to 0 (contexts then stay within max_position_embeddings)"
            )
        self.cfg, self.dtype, self.device, self.tp = cfg, dtype, device, tp
        n = 1 if tp is None else tp.world_size
        self.H, self.Hkv, self.D = cfg.head_num // n, cfg.kv_head_num // n, cfg.size_per_head  # this rank's heads
        self.hidden = hidden_size(cfg)

        def t(name: str) -> torch.Tensor:  # fp16 memmap -> compute dtype on device (a copy as stored, then cast)
            return torch.from_numpy(np.array(weights[name])).to(device=device, dtype=dtype)

        # fp32 compute on a CPU the fp16-weight kernel runs on: the matrices stay in the workspace's fp16 (exact in
        # fp32, half the bytes to read per step), packed for runtime.cpu_f16w, which multiplies them in fp32.
        f16_mats = dtype == torch.float32 and torch.device(device).type == "cpu" and cpu_f16w.available()

        def kept_f16(names: tuple[str, ...]) -> bool:  # matrices the fp16-weight kernel multiplies as stored
            return f16_mats and all(weights[n].dtype == np.float16 for n in names)

        # The matrices a decode step streams through, as (files side by side, transposed?): output is (vocab rows,
        # hidden) as stored; a layer's are stored (in, out) and held (out, in).
        def layer_plan(i: int) -> list[tuple[tuple[str, ...], bool]]:
            return [(tuple(f"layers.{i}.{n}" for n in names), True) for names in _MATRIX_FILES]

        plan = [(("output.weight",), False)] + [e for i in range(cfg.num_layer) for e in layer_plan(i)]

        # On the CPU they live on huge pages, in one arena sized from the stored shapes before anything is read;
        # each matrix is built and moved there in turn, and the pages of its mapped file are let go, so the load
        # holds about one copy of the weights (SmolLM2-135M engine peak 1293 -> 766 MB; before, the files' pages,
        # every transposed matrix and the arena were all held at the end).
        def held(names: tuple[str, ...], transposed: bool) -> tuple[tuple, torch.dtype]:  # (shape, dtype) as held
            rows, cols = weights[names[0]].shape
            shape = (sum(weights[n].shape[1] for n in names), rows) if transposed else (rows, cols)
            return (cpu_f16w.Panels.data_shape(*shape), torch.float16) if kept_f16(names) else (shape, dtype)

        on_cpu = torch.device(device).type == "cpu"
        arena = hugepages.Arena(sum(hugepages.nbytes(*held(*e)) for e in plan)) if on_cpu else None

        def place(names: tuple[str, ...], transposed: bool):  # the matrix, built and moved into the arena
            parts = [torch.from_numpy(np.array(weights[n])) for n in names]  # copies as stored (fp16)
            for n in names:
                release_pages(weights[n])
            w = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            w = w.T if transposed else w  # (out, in): a view; the copy that stores it transposes and casts
            if arena is None:
                return w.to(device=device, dtype=dtype).contiguous()
            out = arena.take(*held(names, transposed))
            return cpu_f16w.Panels.pack(w, out) if kept_f16(names) else out.copy_(w)

        # Embedding kept in fp16: rows are gathered then cast (saves a full-precision copy).
        self.tok_embeddings = torch.from_numpy(weights["tok_embeddings.weight"][...].copy()).to(device)
        release_pages(weights["tok_embeddings.weight"])
        self.vocab_rows = self.tok_embeddings.shape[0]  # vocab_size, or one rank's padded_vocab / N
        self.vocab_start = 0 if tp is None else tp.rank * self.vocab_rows  # first token id of this rank's rows
        self.norm = t("norm.weight")
        self.output = place(*plan[0])  # (vocab rows, hidden), not transposed
        self.layers = []
        for i in range(cfg.num_layer):
            p = f"layers.{i}."
            self.layers.append(
                {
                    "attention_norm": t(p + "attention_norm.weight"),
                    "ffn_norm": t(p + "ffn_norm.weight"),
                    **{k: place(*e) for k, e in zip(MATRICES, layer_plan(i), strict=True)},
                    "bqkv": t(p + "attention.w_qkv.bias") if cfg.attn_bias else None,
                    "bo": t(p + "attention.wo.bias") if cfg.attn_bias else None,
                }
            )
        max_len = max_len or cfg.session_len
        inv_freq = cfg.rope_theta ** (-torch.arange(0, self.D, 2, dtype=torch.float64) / self.D)  # (D/2,)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None]  # (S, D/2)
        # e^(i angle) per (position, pair): an interleaved pair (x0, x1) read as x0 + i x1 rotates by one product
        self.rotations = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(device)  # (S, D/2)
        self.use_decode_graph = True  # False: every decode step through the Python layer loop below (tests)
        # per KV cache (engines may share these weights): (its fast_write, DecodeGraph or None), made at its first
        # decode step, dropped with the cache
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def nbytes(self) -> int:
        """Bytes of the weights this process holds (the RoPE tables are not counted)."""
        tensors = [self.tok_embeddings, self.norm, self.output]
        tensors += [w for layer in self.layers for w in layer.values() if w is not None]
        return sum(w.nbytes for w in tensors)  # tensors' and cpu_f16w.Panels' (their packed data)

    # ------------------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * w, computed in fp32 and rounded once to the compute dtype."""
        return rms_norm(x, w, self.cfg.norm_eps)  # one op (bf16/fp16 inputs: fp32 inside; bf16 CPU: C++)

    @property
    def max_positions(self) -> int:
        """Positions the RoPE table covers."""
        return self.rotations.shape[0]

    def rope_qk(self, qkv: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated q and k heads of fused qkv rows (N, (H + 2 H_kv) D) at positions pos (N,) -> q (N, H, D),
        k (N, H_kv, D): one kernel call for CPU bf16 (runtime.cpu_linear.rope_qk), else `rope` on both at once."""
        H, Hkv, D = self.H, self.Hkv, self.D
        fused = rope_qk(qkv, self.rotations, pos, H, Hkv, D)
        if fused is not None:
            return fused
        N = qkv.shape[0]
        qk = self.rope(
            qkv[:, : (H + Hkv) * D].view(1, N, H + Hkv, D).transpose(1, 2), self.rotations[pos].view(1, 1, N, -1)
        )
        return qk[0, :H].transpose(0, 1), qk[0, H:].transpose(0, 1)

    def rope(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x (B, heads, T, D) with interleaved pairs; rot (B, 1, T, D/2) complex64 = cos + i sin.

        (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x0 sin + x1 cos): the rotation above, in fp32."""
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, heads, T, D/2)
        return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache, batch: Batch, *, use_context_fmha: int = 1, all_logits: bool = False
    ) -> torch.Tensor | None:
        """tokens (B, T) -> fp32 logits (B, T, vocab) if all_logits else (B, vocab) at each sequence's last token
        (None on a tensor-parallel rank other than 0).

        Only the valid tokens (the first counts[b] of row b) are computed: they are packed into one row of
        N = sum(counts) tokens for every per-token operation (projections, norms, RoPE, FFN), so right-padding
        costs nothing; attention then runs per sequence over its own slice (`attention`)."""
        B, T = tokens.shape
        if T == 1 and not all_logits and (graph := self.decode_graph(cache, B)) is not None:
            return graph(tokens[:, 0], batch)  # the same kernels as below, in one C++ call
        counts = torch.tensor(batch.counts)
        if T == 1:
            flat, pos = tokens[:, 0], batch.starts
        else:
            valid = torch.arange(T).view(1, T) < counts.view(B, 1)  # (B, T)
            flat = tokens[valid.to(tokens.device)]
            pos = (batch.starts.view(B, 1) + torch.arange(T).view(1, T))[valid]  # (N,), sequence by sequence
        N = flat.shape[0]
        x = self.embed(flat.view(1, N))  # (1, N, hidden)
        pos = pos.to(self.rotations.device)
        H, Hkv, D = self.H, self.Hkv, self.D
        h = self.rms_norm(x, self.layers[0]["attention_norm"])
        for i, L in enumerate(self.layers):
            qkv = linear(h, L["wqkv"]).view(N, -1)  # (N, (H + 2 H_kv) D)
            if L["bqkv"] is not None:
                qkv = qkv + L["bqkv"]
            q, k = self.rope_qk(qkv, pos)  # (N, H, D), (N, H_kv, D)
            q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, N, D), (H_kv, N, D) views
            v = qkv[:, (H + Hkv) * D :].view(N, Hkv, D)
            history = None
            if cache.channel_keys and T > 1 and not use_context_fmha:  # before this write completes their blocks
                history = [
                    cache.open_history(i, ids, s, q.dtype)
                    for ids, s in zip(batch.block_ids, batch.starts.tolist(), strict=True)
                ]
            cache.write(i, batch.slot_mapping, k.transpose(0, 1), v, batch.key_plan)  # (N, H_kv, D)
            o = self.attention(i, q, k, v.transpose(0, 1), cache, batch, use_context_fmha, T == 1, history)
            y = linear(o, L["wo"])  # (1, N, hidden); with TP this rank's heads' share
            if self.tp is not None:
                self.tp.all_reduce(y)
            if L["bo"] is not None:
                x = x + y
                y = L["bo"].expand_as(x)
            x, h = add_rms_norm(x, y, L["ffn_norm"], self.cfg.norm_eps)  # x + y, and its norm
            y = swiglu_linear(linear(h, L["w13"]), L["w2"])  # (1, N, hidden); with TP a partial sum
            if self.tp is not None:
                self.tp.all_reduce(y)
            last = i + 1 == len(self.layers)
            x, h = add_rms_norm(x, y, self.norm if last else self.layers[i + 1]["attention_norm"], self.cfg.norm_eps)
        if not all_logits and T > 1:  # only each sequence's last real token
            h = h[:, (counts.cumsum(0) - 1).to(h.device)]  # (1, B, hidden)
        logits = linear(h, self.output).float()  # (1, N or B, vocab rows)
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits)  # rank 0: (1, N or B, padded vocab); others: None
            if logits is None:
                return None
            logits = logits[..., : self.cfg.vocab_size]
        if not all_logits:
            return logits[0]  # (B, vocab)
        if T == 1:
            return logits[0].unsqueeze(1)
        out = logits.new_zeros(B, T, logits.shape[-1])  # padding positions: zeros
        out[valid.to(out.device)] = logits[0]
        return out

    def decode_graph(self, cache: KVCache, B: int) -> DecodeGraph | None:
        """runtime.cpu_step's one-call decode step on this cache for B sequences, or None where it does not apply."""
        if not self.use_decode_graph or DecodeGraph.pending(cache):
            return None
        held = self._graphs.get(cache)
        if held is None or held[0] != cache.fast_write or (held[1] is not None and not held[1].bound_to(cache)):
            held = self._graphs[cache] = (cache.fast_write, DecodeGraph.build(self, cache))
        graph = held[1]
        return graph if graph is not None and B <= graph.max_batch else None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, hidden) in the compute dtype."""
        if self.tp is None:
            return self.tok_embeddings[tokens].to(self.dtype)
        local = tokens - self.vocab_start  # row in this rank's slice; outside [0, rows): another rank's token
        mine = (local >= 0) & (local < self.vocab_rows)  # (B, T)
        x = self.tok_embeddings[local.clamp(0, self.vocab_rows - 1)].to(self.dtype)
        x.masked_fill_(~mine.unsqueeze(-1), 0)
        self.tp.all_reduce(x)
        return x

    def attention(
        self, i: int, q, k, v, cache: KVCache, batch: Batch, use_context_fmha: int, decode: bool, history=None
    ) -> torch.Tensor:
        """q (H, N, D), k/v (H_kv, N, D) of this step's N packed tokens (already written to the cache) -> (1, N, H D).

        decode (one token per sequence): one paged-attention call over the cache for the whole batch. Prefill:
        per sequence, over its own slice of the packed tokens (see the module docstring for use_context_fmha).
        history (per-channel keys, use_context_fmha 0): each sequence's open-block key rows from before the write
        (`KVCache.open_history`); with them each query sees the keys as a decode step at its position would."""
        H, N, D = q.shape
        scale = 1.0 / math.sqrt(D)
        if decode:  # the new tokens are in the cache already
            o = cache.decode_attention(
                i, q.transpose(0, 1), batch.block_tables, batch.lengths, scale, batch.max_length
            )  # (B, H, D)
            return o.reshape(1, N, H * D)
        out, offset = [], 0
        for b, (start, n) in enumerate(zip(batch.starts.tolist(), batch.counts, strict=True)):
            qb, kb, vb = (t[None, :, offset : offset + n] for t in (q, k, v))  # (1, heads, n, D)
            chunk_keys = kb
            offset += n
            if use_context_fmha and start == 0:  # causal over the chunk's own unquantized K/V
                o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
            else:
                table = batch.block_tables[b : b + 1]
                if use_context_fmha:  # keys = [history | this chunk unquantized]
                    kh, vh = cache.read(i, table, start, q.dtype, cached=start + n)  # (1, H_kv, start, D)
                    kb, vb = torch.cat([kh, kb], dim=2), torch.cat([vh, vb], dim=2)
                else:  # keys = the cache prefix, this chunk read back after quantization
                    kb, vb = cache.read(i, table, start + n, q.dtype)
                j = torch.arange(start + n, device=q.device).view(1, -1)
                mask = j <= start + torch.arange(n, device=q.device).view(-1, 1)  # (n, start + n): causal
                if history is not None:
                    kb, vb, mask = as_decode_sees(cache, history[b], kb, vb, chunk_keys, start, mask)
                o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
            out.append(o[0].transpose(0, 1).reshape(n, H * D))
        return torch.cat(out).unsqueeze(0)
