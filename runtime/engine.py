"""The engine: a workspace's weights, a paged KV pool sized by a memory budget, and the step loop.

    engine = Engine("./workspace", kv_cache_dtype="int8", kv_cache_gib=2)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...          # StepOutput: request_id, new_token_ids, finished, finish_reason

The pool: `num_blocks` blocks of `block_size` tokens per layer in the KV storage dtype, as many as the
budget holds (`kv_cache_gib`, or `cache_max_entry_count` x the memory free after the weights are loaded;
see `pool_budget`). INT8/FP8 blocks are half the bytes of fp16 ones, so the same budget holds twice the
tokens, and the scheduler (`runtime.scheduler`) runs twice the sequences at once. The online per-token-head
modes (int8/fp8/int4_per_token_head) keep 4 bytes of (scale, zero) per row inside each block: INT4 at D 64
is 36 bytes a row against fp16's 128, 3.56x the tokens.

Each `step` asks the scheduler what to run, then makes at most two forward passes: one over the prefill
chunks (packed by the model: padding is never computed) and one over every running decode (one token each). Sequences whose
fed tokens reached their end sample a token; EOS (unless ignore_eos), a stop token or max_tokens ends them.
Stop *strings* are the caller's (it detokenizes and calls `abort_request`).

On top of that loop: `generate` (many prompts, results in order), chat sessions that keep their blocks
between turns (`new_session` / `stream` / `end_session`) and `score`, a teacher-forced prefill for lite.eval.
The engine is not thread-safe: one thread owns it.

Tensor parallelism (`runtime.distributed`): with `tensor_parallel_size=N` or under torchrun, this process
holds one rank's weights and H_kv / N KV heads of every block. Rank 0's engine is the whole engine above;
each forward pass it makes is first sent to the other ranks, whose engines only run those forwards.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from runtime import cpu_attention, distributed, kv_params, quant
from runtime.kv_cache import (
    DEFAULT_ROTATION,
    KVCache,
    OnlineQuantizer,
    StaticQuantizer,
    block_bytes,
    rotation_for,
)
from runtime.model import Batch, Transformer
from runtime.scheduler import RequestError, Scheduler, Sequence, Status, peak_blocks
from runtime.tokenizer import load_tokenizer
from runtime.workspace import (
    KV_GRANULARITIES,
    WorkspaceError,
    kv_bytes_per_token,
    load_config,
    read_joined,
    read_rank,
    release_heap,
    weights_dir,
)

__all__ = ["Engine", "EngineStats", "RequestError", "Session", "StepOutput"]

KV_ALIASES = {
    "fp8": "fp8_e4m3",
    "fp16": "fp16",
    "int8": "int8",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    **{mode: mode for mode in quant.ONLINE_MODES},  # int8 | fp8 | int4 _per_token_head: no calibration files
}
KV_ROTATIONS = ("auto", "on", "off")  # auto: kv_cache.DEFAULT_ROTATION of the online mode
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Overrides what dtype="auto" resolves to (the test suite pins float32, the dtype of its accuracy checks).
AUTO_DTYPE_ENV = "KVQ_COMPUTE_DTYPE"
# Fraction of free memory given to the KV pool when neither kv_cache_gib nor cache_max_entry_count is set.
# GPU: LMDeploy's 0.8 of the memory free after the weights. CPU: 0.2 of MemAvailable, because there the
# same RAM also holds the page cache of the memory-mapped weights, the activations of 4096-token prefill
# chunks, the tokenizer and every other process, and the pool is zero-filled (touched) when allocated.
DEFAULT_CACHE_FRACTION = {"cuda": 0.8, "cpu": 0.2}
DEFAULT_BLOCK_SIZE = 64  # tokens per block, as LMDeploy
DEFAULT_MAX_BATCH_SIZE = 256  # running sequences at once (vLLM's max_num_seqs); the pool is the usual limit


def resolve_compute_dtype(dtype: str, device: str) -> str:
    """The compute dtype's name; "auto" picks the fastest one that keeps the model's accuracy on `device`:
    float16 on a GPU (the workspace's weight dtype); on a CPU, bfloat16 where the CPU computes it natively
    (AVX512-BF16 or AMX-BF16: bf16 GEMMs 2.5-3x faster than fp32 there, half the weight bytes), else float32
    (emulated bf16 is slower than fp32). $KVQ_COMPUTE_DTYPE, when set, replaces auto's choice."""
    where, override = "dtype", os.environ.get(AUTO_DTYPE_ENV)
    if dtype == "auto" and override:
        dtype, where = override, f"${AUTO_DTYPE_ENV}"
    elif dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "bfloat16" if cpu_has_native_bf16() else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"{where} = {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    return dtype


def cpu_has_native_bf16() -> bool:
    """Does this CPU have bf16 arithmetic instructions (x86 AVX512-BF16 or AMX-BF16; Linux /proc/cpuinfo)?"""
    from runtime.cpp_build import cpu_has

    return cpu_has("avx512_bf16") or cpu_has("amx_bf16")


def default_block_size(kv_dtype: str, head_dim: int) -> int:
    """DEFAULT_BLOCK_SIZE, or for int4_per_token_head at most 2 x head_dim: its open blocks keep their key rows'
    (scale, zero) pairs in a block's per-channel parameters (2 x head_dim values). An explicit larger
    block_size is refused by KVCache."""
    if quant.channel_keys(kv_dtype) and not quant.channel_block_fits(DEFAULT_BLOCK_SIZE, head_dim):
        return 2 * head_dim
    return DEFAULT_BLOCK_SIZE


@dataclass
class EngineSettings:
    """Run-time choices, validated once. None / "auto" = the workspace's config.ini value or the default."""

    kv_cache_dtype: str = "auto"  # auto | fp16 | int8 | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2 | *_per_token_head
    calculate_kv_scales: bool = False  # FP8 only: per-layer scales from the first prompt's amax
    dtype: str = "auto"  # compute dtype: auto | float32 | bfloat16 | float16 (see resolve_compute_dtype)
    device: str = "cpu"
    max_batch_size: int | None = None  # running sequences at once
    session_len: int | None = None  # per-request limit (prompt + output), <= max_position_embeddings
    use_context_fmha: int | None = None
    kv_granularity: str | None = None  # tensor | head: which scale files to load (default: config.ini)
    block_size: int | None = None  # tokens per block; None = DEFAULT_BLOCK_SIZE (see Engine.block_size)
    cache_max_entry_count: float | None = None  # fraction of free memory for the pool
    kv_cache_gib: float | None = None  # explicit pool size; wins over cache_max_entry_count
    max_prefill_token_num: int = 4096  # prefill tokens per step (longer prompts go in chunks)
    kv_rotation: str = "auto"  # online modes: Hadamard rotation of K, V, q (auto = the mode's measured default)

    def __post_init__(self) -> None:
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_ALIASES:
            raise ValueError(
                f"kv_cache_dtype = {self.kv_cache_dtype!r}: expected auto or one of {', '.join(KV_ALIASES)}"
            )
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device = {self.device!r}: expected cpu or cuda")
        self.dtype = resolve_compute_dtype(self.dtype, self.device)
        for key in ("max_batch_size", "session_len", "block_size", "max_prefill_token_num"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"{key} = {getattr(self, key)!r}: must be positive")
        if self.cache_max_entry_count is not None and not 0 < self.cache_max_entry_count <= 1:
            raise ValueError(
                f"cache_max_entry_count = {self.cache_max_entry_count!r}: must be a fraction in (0, 1] of the "
                "free memory (use kv_cache_gib for an absolute size)"
            )
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib = {self.kv_cache_gib!r}: must be positive")
        if self.use_context_fmha not in (None, 0, 1):
            raise ValueError(f"use_context_fmha = {self.use_context_fmha!r}: must be 0 or 1")
        if self.kv_rotation not in KV_ROTATIONS:
            raise ValueError(f"kv_rotation = {self.kv_rotation!r}: expected one of {', '.join(KV_ROTATIONS)}")
        if self.kv_granularity not in (None, *KV_GRANULARITIES):
            raise ValueError(f"kv_granularity = {self.kv_granularity!r}: expected one of {', '.join(KV_GRANULARITIES)}")

    def resolve_kv_dtype(self, config_value: str) -> str:
        kv = config_value if self.kv_cache_dtype == "auto" else KV_ALIASES[self.kv_cache_dtype]
        if self.calculate_kv_scales and kv not in quant.FP8_DTYPES:
            raise ValueError(
                f"calculate_kv_scales=True needs an FP8 KV cache (kv_cache_dtype fp8 | fp8_e4m3 | fp8_e5m2), got {kv}"
            )
        return kv


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]  # 0 or 1 token
    finished: bool
    finish_reason: str | None  # stop | length (abort: only reported to whoever aborted)
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    block_size: int
    kv_dtype: str
    kv_cache_tokens: int
    num_preemptions: int  # cumulative
    num_generated_tokens: int  # cumulative
    num_prompt_tokens: int  # cumulative prompt tokens of added requests


@dataclass
class Session:
    """A chat conversation: one sequence whose blocks stay in the pool between turns (unless evicted)."""

    seq: Sequence
    ended: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens in the conversation so far (cached or not)."""
        return len(self.seq.token_ids)


@dataclass
class _RequestState:
    generator: torch.Generator | None


class Engine:
    def __init__(
        self,
        workspace_path,
        *,
        kv_cache_dtype: str = "auto",
        calculate_kv_scales: bool = False,
        dtype: str = "auto",
        device: str = "cpu",
        max_batch_size: int | None = None,
        session_len: int | None = None,
        use_context_fmha: int | None = None,
        kv_granularity: str | None = None,
        block_size: int | None = None,
        cache_max_entry_count: float | None = None,
        kv_cache_gib: float | None = None,
        max_prefill_token_num: int = 4096,
        kv_rotation: str = "auto",
        kv_params: kv_params.KVParams | None = None,
        model: Transformer | None = None,
        tensor_parallel_size: int | None = None,
    ) -> None:
        """kv_rotation: auto | on | off, the Hadamard rotation of an online (per-token-head) KV mode.
        kv_params: explicit parameters (e.g. lite.eval's scale-1.0 baseline) instead of the workspace files.
        model: the weights of another engine on the same workspace, dtype and device, shared instead of loaded
        again (lite.eval runs one engine per KV mode).
        tensor_parallel_size: N = config.ini's tensor_para_size runs one process per rank, this one being
        rank 0 (`runtime.distributed` starts the others); None = one process (a TP workspace's ranks joined),
        or under torchrun the rank torchrun gave this process."""
        from runtime.templates import get_template

        self.settings = s = EngineSettings(
            kv_cache_dtype,
            calculate_kv_scales,
            dtype,
            device,
            max_batch_size,
            session_len,
            use_context_fmha,
            kv_granularity,
            block_size,
            cache_max_entry_count,
            kv_cache_gib,
            max_prefill_token_num,
            kv_rotation,
        )
        self.wdir = weights_dir(workspace_path)
        self.config = cfg = load_config(self.wdir)
        self.kv_dtype = s.resolve_kv_dtype(cfg.kv_cache_dtype)
        if s.session_len is not None and s.session_len > max(cfg.max_position_embeddings, cfg.session_len):
            raise ValueError(
                f"session_len = {s.session_len} > the model's max_position_embeddings {cfg.max_position_embeddings} "
                f"(config.ini); use at most {max(cfg.max_position_embeddings, cfg.session_len)}"
            )
        self.session_len = s.session_len or cfg.session_len
        self.max_batch_size = s.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        self.use_context_fmha = cfg.use_context_fmha if s.use_context_fmha is None else s.use_context_fmha
        self.device = torch.device(s.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device = {s.device!r} but this torch build sees no CUDA device; use device='cpu'")
        if self.device.type == "cpu":
            cpu_attention.build_choice()  # a mistyped $KVQ_ATTENTION_BUILD fails here, not at the first decode step
        self.template = get_template(cfg.model_name)
        self.kv_granularity = s.kv_granularity or cfg.kv_granularity
        self.block_size = s.block_size or default_block_size(self.kv_dtype, cfg.size_per_head)
        # Everything above is checked on every rank before any process is started or joined.
        worker_args = {**dataclasses.asdict(s), "kv_params": kv_params}
        self.tp = distributed.setup(cfg, s.device, tensor_parallel_size, workspace_path, worker_args)
        try:
            # A TP worker (rank > 0) never samples or detokenizes; importing transformers is most of its start-up.
            self.tokenizer = None if self.tp is not None and self.tp.rank > 0 else _load_tokenizer(self.wdir)
            self._load_rank(model, kv_params)
        except BaseException as e:
            if self.tp is not None:  # the other ranks see this rank leave instead of waiting for it
                self.tp.abort(f"rank {self.tp.rank} failed to start: {e!r}")
            raise
        self.scheduler = Scheduler(
            self.cache.num_blocks,
            self.block_size,
            max_running=self.max_batch_size,
            max_prefill_tokens=s.max_prefill_token_num,
            session_len=self.session_len,
            open_block_helper=self.cache.channel_keys,
        )
        stop_ids = self.template.stop_token_ids(self.tokenizer) if self.tokenizer is not None else []
        self.eos_ids = {cfg.end_id, *stop_ids}
        self._ids = itertools.count()
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0

    def _load_rank(self, model: Transformer | None, explicit: kv_params.KVParams | None) -> None:
        """This process's weights, KV quantizer and pool: all of them, or one TP rank's share."""
        cfg, s, tp = self.config, self.settings, self.tp
        self.kv_heads = cfg.kv_head_num // (tp.world_size if tp else 1)  # KV heads in this process's pool
        if tp is not None:
            if model is not None:
                raise ValueError("model= shares weights between engines of one process; not with tensor parallelism")
            self.device = tp.device
        if model is None:
            weights = read_joined(self.wdir, cfg) if tp is None else read_rank(self.wdir, cfg, tp.rank)
            model = Transformer(
                cfg, weights, dtype=DTYPES[s.dtype], device=self.device, max_len=self.session_len, tp=tp
            )
            del weights
            release_heap()  # the load's freed copies, before the pool is sized from the memory left
        elif (model.cfg, model.dtype, torch.device(model.device)) != (cfg, DTYPES[s.dtype], self.device) or (
            model.max_positions < self.session_len
        ):
            raise ValueError(
                "model= must come from an engine on the same workspace, dtype, device and at least this session_len"
            )
        self.model = model
        self.quantizer, self.scale_source = self._make_quantizer(explicit)
        num_blocks, self.budget_source = self.pool_budget()
        if tp is not None:  # rank 0's block ids must exist on every rank: the smallest pool of any rank
            agreed = tp.agree_min(num_blocks)
            if agreed < num_blocks:
                self.budget_source += f", lowered to {agreed} blocks by another rank's budget"
            num_blocks = agreed
        self.cache = KVCache(
            cfg.num_layer,
            num_blocks,
            self.kv_heads,
            self.block_size,
            cfg.size_per_head,
            self.quantizer,
            self.device,
            kernels=_kernels(self.device),
        )
        mine = [self.model.nbytes(), self.cache.nbytes()]
        # (weight bytes, KV pool bytes) per rank, measured on each rank: for the banner and the memory report
        self.rank_bytes = [mine] if tp is None else tp.all_gather_ints(mine)

    def close(self) -> None:
        """Stop the tensor-parallel workers and leave the process group (nothing to do in one process)."""
        if self.tp is not None:
            self.tp.close()

    def _make_quantizer(self, explicit: kv_params.KVParams | None) -> tuple[StaticQuantizer | OnlineQuantizer, str]:
        cfg, kv, heads, rank = self.config, self.kv_dtype, self.kv_heads, self.tp.rank if self.tp else None
        if quant.is_online(kv):  # parameters per row at write time; calibrated files, if any, are unused
            rotation = rotation_for(kv, cfg.size_per_head, self.settings.kv_rotation)
            how = "Hadamard-rotated" if rotation is not None else "unrotated"
            return OnlineQuantizer(kv, rotation, device=self.device), f"per token and KV head at write time, {how}"
        if kv == "fp16":
            return StaticQuantizer.identity(kv, cfg.num_layer, heads, device=self.device), "none needed"
        if self.settings.calculate_kv_scales:  # with TP: each rank's scales from its own heads' amax
            q = StaticQuantizer.identity(kv, cfg.num_layer, heads, dynamic=True, device=self.device)
            return q, "calculated on the fly from the first prompt (per layer, with headroom)"
        if explicit is not None:
            if explicit.kv_dtype != kv or explicit.k_scale.shape != (cfg.num_layer, cfg.kv_head_num):
                raise ValueError(
                    f"kv_params are {explicit.kv_dtype} {tuple(explicit.k_scale.shape)}, the engine needs {kv} "
                    f"({cfg.num_layer}, {cfg.kv_head_num})"
                )
            lo = (rank or 0) * heads  # this rank's KV heads
            cols = [t[:, lo : lo + heads] for t in (explicit.k_scale, explicit.k_zp, explicit.v_scale, explicit.v_zp)]
            p, source = kv_params.KVParams(kv, explicit.granularity, *cols), "given by the caller"
        else:
            # raises with the fix when missing/malformed; a TP rank reads only its own files
            p = kv_params.read(self.wdir, cfg, kv, self.kv_granularity, rank=rank)
            name = kv_params.file_name(0, 0, kv, self.kv_granularity).replace("layers.0.", "layers.*.")
            source = f"loaded from {self.wdir}/{name.replace('.0.weight', '.*.weight')}"
        return StaticQuantizer(kv, p.k_scale, p.k_zp, p.v_scale, p.v_zp, device=self.device), source

    # -- the memory budget ------------------------------------------------------------------------
    def block_bytes(self) -> int:
        cfg = self.config
        return block_bytes(
            cfg.num_layer, self.kv_heads, self.block_size, self.quantizer.row_bytes(cfg.size_per_head, self.block_size)
        )

    def pool_budget(self) -> tuple[int, str]:
        """(num_blocks, how the budget was chosen). Blocks = (budget - quantization parameters) // block bytes,
        at most what max_batch_size full-length sequences could use. With tensor parallelism the budget is this
        rank's: kv_cache_gib per rank; a fraction of the free memory of its GPU, or on the CPU, where the ranks
        share one RAM, that fraction divided by the number of ranks."""
        s = self.settings
        if s.kv_cache_gib is not None:
            budget, how = s.kv_cache_gib * 2**30, f"kv_cache_gib {s.kv_cache_gib:g}"
        else:
            frac = s.cache_max_entry_count or DEFAULT_CACHE_FRACTION[self.device.type]
            free = _free_memory(self.device)
            share = self.tp.world_size if self.tp is not None and self.device.type == "cpu" else 1
            budget = frac * free / share
            how = f"cache_max_entry_count {frac:g} x {free / 2**30:.1f} GiB free"
            how += f" / {share} ranks" if share > 1 else ""
        per_block = self.block_bytes()
        num_blocks = int((budget - self.quantizer.param_bytes()) // per_block)
        # per sequence: its blocks at session_len, with the helper block INT4's per-channel keys hold
        useful = self.max_batch_size * peak_blocks(self.session_len, self.block_size, quant.channel_keys(self.kv_dtype))
        if num_blocks > useful:
            num_blocks, how = useful, f"{how}, capped at max_batch_size {self.max_batch_size} x session_len"
        if num_blocks < 1:
            raise ValueError(
                f"the KV budget ({how} = {budget / 2**20:.1f} MiB) holds no {self.kv_dtype} block of "
                f"{self.block_size} tokens ({per_block / 2**20:.2f} MiB); raise kv_cache_gib or cache_max_entry_count"
            )
        return num_blocks, how

    @property
    def num_kv_blocks(self) -> int:
        return self.scheduler.num_blocks

    @property
    def kv_cache_tokens(self) -> int:
        return self.scheduler.capacity_tokens

    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    def banner(self) -> str:
        """The 'what fits' line: pool size in tokens, bytes per token, concurrency at the session length."""
        cfg = self.config
        per_token = kv_bytes_per_token(cfg, self.quantizer.row_bytes(cfg.size_per_head, self.block_size))
        fits = self.kv_cache_tokens / self.session_len
        granularity = "-" if self.kv_dtype == "fp16" or quant.is_online(self.kv_dtype) else self.kv_granularity
        line = (
            f"KV cache {self.kv_dtype} ({'int8 quant_policy 4' if self.kv_dtype == 'int8' else 'no quant_policy bit'}), "
            f"granularity {granularity}, scales {self.scale_source}; "
            f"KV cache size: {self.num_kv_blocks} blocks x {self.block_size} = {self.kv_cache_tokens} tokens, "
            f"{per_token:.0f} bytes/token{' with the scales' if quant.is_online(self.kv_dtype) else ''}, "
            f"{self.cache_bytes() / 2**20:.1f} MiB"
            f"{' per rank' if self.tp else ''} ({self.budget_source}); "
            f"maximum concurrency for {self.session_len} tokens per request: {fits:.2f}x; "
            f"use_context_fmha={self.use_context_fmha}, compute {self.settings.dtype} on {self.device}"
        )
        if self.tp is None:
            return line
        n = self.tp.world_size
        ranks = ", ".join(f"rank {r} {w / 2**20:.1f} + {kv / 2**20:.1f}" for r, (w, kv) in enumerate(self.rank_bytes))
        return (
            f"{line}; tensor parallel: {n} processes, each with {cfg.head_num // n} of {cfg.head_num} heads, "
            f"{self.kv_heads} of {cfg.kv_head_num} KV heads and 1/{n} of the vocabulary; "
            f"MiB weights + KV pool per rank: {ranks}"
        )

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params, request_id: str | None = None) -> str:
        """Queue a request; RequestError (with the numbers) if it can never run. Returns its id."""
        if not prompt_token_ids:
            raise RequestError("empty prompt: give at least one token")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params)
        seq.state = _new_state(params)
        self.scheduler.add(seq)
        self.num_prompt_tokens += len(prompt_token_ids)
        return request_id

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(str(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        sch = self.scheduler
        return EngineStats(
            num_running=len(sch.running),
            num_waiting=len(sch.waiting),
            num_blocks=sch.num_blocks,
            num_free_blocks=sch.allocator.num_free,
            block_size=self.block_size,
            kv_dtype=self.kv_dtype,
            kv_cache_tokens=self.kv_cache_tokens,
            num_preemptions=sch.num_preemptions,
            num_generated_tokens=self.num_generated_tokens,
            num_prompt_tokens=self.num_prompt_tokens,
        )

    def stops(self, token: int, params) -> bool:
        """Does `token` end generation (EOS unless ignore_eos, or one of params.stop_token_ids)?"""
        return (not params.ignore_eos and token in self.eos_ids) or token in (params.stop_token_ids or ())

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One scheduler iteration: prefill chunks in one forward pass, every decode in another."""
        from runtime.sampling import greedy_rows, sample_next

        plan = self.scheduler.schedule()
        outputs = []
        for chunks in (plan.prefills, plan.decodes):
            if not chunks:
                continue
            logits = self._forward(chunks)  # (len(chunks), V) fp32
            greedy = greedy_rows(logits, [c.seq.params if c.samples else None for c in chunks])
            for i, (chunk, row) in enumerate(zip(chunks, logits, strict=True)):
                self.scheduler.commit(chunk)
                seq = chunk.seq
                if not chunk.samples:
                    continue
                token = greedy[i] if i in greedy else sample_next(row, seq.token_ids, seq.params, seq.state.generator)
                seq.token_ids.append(token)
                self.num_generated_tokens += 1
                reason = (
                    "stop"
                    if self.stops(token, seq.params)
                    else "length"
                    if seq.num_output_tokens >= seq.params.max_tokens
                    else None
                )
                if reason is not None:
                    self.scheduler.finish(seq, reason)
                outputs.append(
                    StepOutput(
                        seq.request_id,
                        [token],
                        reason is not None,
                        reason,
                        seq.num_prompt_tokens,
                        seq.num_output_tokens,
                    )
                )
        return outputs

    def _forward(self, chunks, all_logits: bool = False) -> torch.Tensor:
        """Feed each chunk's tokens through the model into its sequence's blocks; logits at each last token."""
        T = max(c.length for c in chunks)
        tokens = torch.zeros(len(chunks), T, dtype=torch.long)  # (B, T), right-padded
        for b, c in enumerate(chunks):
            tokens[b, : c.length] = torch.tensor(c.seq.token_ids[c.start : c.start + c.length])
        batch = Batch.build(
            [c.seq.block_ids for c in chunks],
            [c.start for c in chunks],
            [c.length for c in chunks],
            self.block_size,
            self.device,
            channel_keys=self.cache.channel_keys,
        )
        if self.tp is not None:  # the workers run the same forward on their shares
            self.tp.broadcast_step(distributed.Step(tokens, batch, self.use_context_fmha, all_logits))
        try:
            logits = self.model.forward(
                tokens.to(self.device), self.cache, batch, use_context_fmha=self.use_context_fmha, all_logits=all_logits
            )
        except BaseException as e:
            if self.tp is not None:  # e.g. Ctrl-C between two all-reduces: the ranks can never line up again
                self.tp.abort(f"rank 0's forward pass was interrupted by {e!r}")
            raise
        return logits.float().cpu()

    def generate(self, prompts: list[list[int]], params: list, stop_check=None) -> list[list[int]]:
        """Generated token ids per prompt, in order, however many prompts (the scheduler queues them).

        stop_check(b, generated_ids) -> bool may end sequence b early (e.g. on a stop string).
        """
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for p, sp in zip(prompts, params, strict=True):  # check all before queueing any
            if not p:
                raise RequestError("empty prompt: give at least one token")
            self.scheduler.check_fits(len(p), sp.max_tokens)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        index = {rid: b for b, rid in enumerate(ids)}
        results: list[list[int]] = [[] for _ in prompts]
        try:
            while self.has_unfinished_requests():
                for out in self.step():
                    b = index.get(out.request_id)
                    if b is None:
                        continue
                    results[b].extend(out.new_token_ids)
                    if not out.finished and stop_check is not None and stop_check(b, results[b]):
                        self.abort_request(out.request_id)
        finally:
            for rid in ids:  # on an exception (Ctrl-C), nothing stays queued or holds blocks
                self.abort_request(rid)
        return results

    # -- chat sessions ----------------------------------------------------------------------------
    def new_session(self) -> Session:
        rid = f"session-{next(self._ids)}"
        return Session(Sequence(rid, [], 0, None, is_session=True, status=Status.PARKED))

    def end_session(self, session: Session) -> None:
        """Free the session's blocks; the session object cannot be used again."""
        self.scheduler.abort(session.seq.request_id)
        session.ended = True

    def stream(self, session: Session, new_token_ids: list[int], params) -> Iterator[int]:
        """Append a turn's tokens to the session and yield the reply's token ids as they are sampled.

        The history stays in the pool between turns, so a turn sends only its new tokens; the reply's last
        token is fed at the start of the next turn. Closing the iterator early (or Ctrl-C) ends the turn and
        keeps the session. Drives `step` itself: do not mix with other requests on the same engine.
        """
        if session.ended:
            raise ValueError("this session was ended; start a new one with engine.new_session()")
        seq = session.seq
        if not new_token_ids and seq.num_uncached == 0:
            raise ValueError("stream needs at least one new token")
        self.scheduler.check_fits(len(seq.token_ids) + len(new_token_ids), params.max_tokens, "session")
        return self._stream(seq, list(new_token_ids), params)

    def _stream(self, seq: Sequence, new: list[int], params) -> Iterator[int]:
        seq.token_ids.extend(new)
        seq.num_prompt_tokens, seq.params, seq.state = len(seq.token_ids), params, _new_state(params)
        self.scheduler.add(seq)
        try:
            while seq.status in (Status.WAITING, Status.RUNNING):
                for out in self.step():
                    if out.request_id == seq.request_id:
                        yield from out.new_token_ids
        finally:
            if seq.status in (Status.WAITING, Status.RUNNING):  # stopped early: park, keep the history
                self.scheduler.finish(seq, "abort")

    # -- scoring (lite.eval) ----------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) fp32, each row prefilled into fresh blocks of this engine's KV mode
        (as many rows per forward pass as free blocks allow)."""
        from runtime.scheduler import Chunk

        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        B, T = token_ids.shape
        if T > self.session_len:
            raise RequestError(f"{T} tokens > session_len {self.session_len}")
        sch = self.scheduler
        need = sch.blocks_for(T)
        sch.check_fits(T, 0, "window")
        sch.make_room(need)
        rows_per_pass = min(B, sch.allocator.num_free // need)
        if rows_per_pass == 0:
            raise RuntimeError(
                f"score needs {need} free KV blocks; {sch.allocator.num_free} are free (requests running)"
            )
        out = []
        for lo in range(0, B, rows_per_pass):
            seqs = [
                Sequence(f"score-{b}", token_ids[b].tolist(), T, None) for b in range(lo, min(B, lo + rows_per_pass))
            ]
            for s in seqs:
                s.block_ids = sch.allocator.allocate(need)
            try:
                out.append(self._forward([Chunk(s, 0, T) for s in seqs], all_logits=True))
            finally:
                for s in seqs:
                    sch.allocator.release(s.block_ids)
        return torch.cat(out)


def add_engine_arguments(p, *, max_batch_size_default: int | None = None) -> None:
    """The engine's command-line options, shared by runtime.chat, runtime.serve and the tools."""
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", *KV_ALIASES],
        help="KV cache storage (default auto = config.ini kv_cache_dtype; fp8 = fp8_e4m3; *_per_token_head: "
        "online scales per token and KV head, no calibration)",
    )
    p.add_argument(
        "--kv-rotation",
        default="auto",
        choices=list(KV_ROTATIONS),
        help="online *_per_token_head modes: Hadamard-rotate K, V and q (default auto, the measured choice: "
        + ", ".join(f"{m} {'on' if on else 'off'}" for m, on in DEFAULT_ROTATION.items())
        + ")",
    )
    p.add_argument(
        "--calculate-kv-scales", action="store_true", help="FP8: per-layer scales from the first prompt (default off)"
    )
    p.add_argument(
        "--kv-granularity",
        choices=list(KV_GRANULARITIES),
        help="which calibrated scale files to load: tensor (per layer) | head (default: config.ini kv_granularity)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="compute dtype (default auto: bfloat16 on a CPU with native bf16, else float32; float16 on cuda)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default: cpu)")
    p.add_argument(
        "--session-len",
        type=int,
        help="tokens per request or chat session, prompt + output (default: config.ini session_len; at most the "
        "model's max_position_embeddings)",
    )
    p.add_argument(
        "--use-context-fmha",
        type=int,
        choices=[0, 1],
        help="1 = prefill attends over unquantized K/V, 0 = over the just-quantized cache (default: config.ini)",
    )
    p.add_argument(
        "--cache-max-entry-count",
        type=float,
        help="KV pool = this fraction of the memory free after loading the weights (default 0.8 on cuda, "
        "0.2 of MemAvailable on cpu)",
    )
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        help="KV pool size in GiB; wins over --cache-max-entry-count (default: none, the fraction decides)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"tokens per KV block (default {DEFAULT_BLOCK_SIZE}; int4_per_token_head: at most 2 x the head size)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=max_batch_size_default,
        help=f"sequences running at once (default {max_batch_size_default or DEFAULT_MAX_BATCH_SIZE})",
    )
    p.add_argument(
        "--max-prefill-token-num",
        type=int,
        default=4096,
        help="prompt tokens prefilled per step; longer prompts go in chunks (default 4096)",
    )


def engine_kwargs(args) -> dict:
    """Engine(...) keyword arguments from the options of `add_engine_arguments`."""
    return dict(
        kv_cache_dtype=args.kv_cache_dtype,
        calculate_kv_scales=args.calculate_kv_scales,
        kv_granularity=args.kv_granularity,
        dtype=args.dtype,
        device=args.device,
        session_len=args.session_len,
        use_context_fmha=args.use_context_fmha,
        cache_max_entry_count=args.cache_max_entry_count,
        kv_cache_gib=args.kv_cache_gib,
        block_size=args.block_size,
        max_batch_size=args.max_batch_size,
        max_prefill_token_num=args.max_prefill_token_num,
        kv_rotation=args.kv_rotation,
    )


def _new_state(params) -> _RequestState:
    from runtime.sampling import make_generator

    return _RequestState(make_generator(params.seed))


def _free_memory(device: torch.device) -> int:
    """Bytes free for the pool: free device memory (after the weights are loaded) or MemAvailable on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; pass kv_cache_gib")


def _kernels(device: torch.device):
    """The CUDA kernels (CuPy, imported only here) on a GPU; None = the PyTorch/C++ CPU path."""
    if device.type != "cuda":
        return None
    try:
        import cupy  # noqa: F401  (checked here: a missing CuPy was a traceback at the first forward pass)
    except ImportError as e:
        cuda = torch.version.cuda or "12"
        raise ValueError(
            f"device = {str(device)!r}: the KV-cache kernels need CuPy ({e}); install the build for this torch's "
            f"CUDA {cuda}: pip install cupy-cuda{cuda.split('.')[0]}x"
        ) from e
    import runtime.cuda

    return runtime.cuda


def _load_tokenizer(wdir):
    tok_dir = wdir.parent / "tokenizer"
    if not tok_dir.is_dir():
        raise WorkspaceError(
            f"no tokenizer directory {tok_dir}; re-run python -m deploy (it copies the HF tokenizer files there)"
        )
    return load_tokenizer(tok_dir)
