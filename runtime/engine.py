"""The engine: a workspace loaded into a `Transformer`, a KV cache of `max_batch_size` slots, and sessions.

A session owns one cache slot for its lifetime. `stream` appends a turn's new tokens (prefill) and
decodes token by token; the generated tokens stay in the session's history, so the next turn sends
only its new tokens. The last yielded token is fed to the cache lazily, at the start of the next
turn (`Session.pending`), which keeps a session consistent even when the consumer stops early.
`generate` runs several sequences of different lengths in one forward pass per step; `score` is a
teacher-forced prefill through a fresh cache in the engine's KV mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from runtime import kv_params, quant
from runtime.kv_cache import KVCache, StaticQuantizer
from runtime.model import Batch, Transformer
from runtime.workspace import (
    KV_GRANULARITIES,
    WorkspaceError,
    kv_bytes_per_token,
    load_config,
    read_joined,
    weights_dir,
)

KV_ALIASES = {"fp8": "fp8_e4m3", "fp16": "fp16", "int8": "int8", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SessionLengthError(ValueError):
    """A turn would overflow the session's cache (history + new tokens + max_tokens > session_len)."""


@dataclass
class EngineSettings:
    """Run-time choices, validated once. None / "auto" = the workspace's config.ini value."""

    kv_cache_dtype: str = "auto"  # auto | fp16 | int8 | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2
    calculate_kv_scales: bool = False  # FP8 only: per-layer scales from the first prompt's amax
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    device: str = "cpu"
    max_batch_size: int | None = None  # cache slots
    session_len: int | None = None
    use_context_fmha: int | None = None
    kv_granularity: str | None = None  # tensor | head: which scale files to load (default: config.ini)

    def __post_init__(self) -> None:
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_ALIASES:
            raise ValueError(
                f"kv_cache_dtype = {self.kv_cache_dtype!r}: expected auto or one of {', '.join(KV_ALIASES)}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device = {self.device!r}: expected cpu or cuda")
        for key in ("max_batch_size", "session_len"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"{key} = {getattr(self, key)!r}: must be positive")
        if self.use_context_fmha not in (None, 0, 1):
            raise ValueError(f"use_context_fmha = {self.use_context_fmha!r}: must be 0 or 1")
        if self.kv_granularity not in (None, *KV_GRANULARITIES):
            raise ValueError(f"kv_granularity = {self.kv_granularity!r}: expected one of {', '.join(KV_GRANULARITIES)}")

    def resolve_kv_dtype(self, config_value: str) -> str:
        kv = config_value if self.kv_cache_dtype == "auto" else KV_ALIASES[self.kv_cache_dtype]
        if self.calculate_kv_scales and not kv.startswith("fp8"):
            raise ValueError(
                f"calculate_kv_scales=True needs an FP8 KV cache (kv_cache_dtype fp8 | fp8_e4m3 | fp8_e5m2), got {kv}"
            )
        return kv


@dataclass
class Session:
    """One conversation's cache slot. num_tokens = tokens in its history (cached + the pending last reply token)."""

    slot: int
    cached: int = 0
    pending: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.cached + len(self.pending)


class Engine:
    def __init__(
        self,
        workspace_path,
        *,
        kv_cache_dtype: str = "auto",
        calculate_kv_scales: bool = False,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int | None = None,
        session_len: int | None = None,
        use_context_fmha: int | None = None,
        kv_granularity: str | None = None,
        kv_params: kv_params.KVParams | None = None,
        model: Transformer | None = None,
    ) -> None:
        """kv_params: explicit parameters (e.g. lite.eval's scale-1.0 baseline) instead of the workspace files.
        model: the weights of another engine on the same workspace, dtype and device, shared instead of loaded
        again (lite.eval runs one engine per KV mode)."""
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
        )
        self.wdir = weights_dir(workspace_path)
        self.config = cfg = load_config(self.wdir)
        self.kv_dtype = s.resolve_kv_dtype(cfg.kv_cache_dtype)
        self.session_len = s.session_len or cfg.session_len
        self.max_batch_size = s.max_batch_size or cfg.max_batch_size
        self.use_context_fmha = cfg.use_context_fmha if s.use_context_fmha is None else s.use_context_fmha
        self.device = torch.device(s.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device = {s.device!r} but this torch build sees no CUDA device; use device='cpu'")
        self.template = get_template(cfg.model_name)
        self.tokenizer = _load_tokenizer(self.wdir)
        if model is None:
            model = Transformer(
                cfg, read_joined(self.wdir, cfg), dtype=DTYPES[s.dtype], device=self.device, max_len=self.session_len
            )
        elif (model.cfg, model.dtype, torch.device(model.device)) != (cfg, DTYPES[s.dtype], self.device) or (
            model.cos.shape[0] < self.session_len
        ):
            raise ValueError(
                "model= must come from an engine on the same workspace, dtype, device and at least this session_len"
            )
        self.model = model
        self.kv_granularity = s.kv_granularity or cfg.kv_granularity
        self.quantizer, self.scale_source = self._make_quantizer(kv_params)
        self.cache = KVCache(
            cfg.num_layer,
            self.max_batch_size,
            cfg.kv_head_num,
            self.session_len,
            cfg.size_per_head,
            self.quantizer,
            self.device,
            kernels=_kernels(self.device),
        )
        self.free_slots = list(range(self.max_batch_size))
        self.eos_ids = {cfg.end_id, *self.template.stop_token_ids(self.tokenizer)}

    def _make_quantizer(self, explicit: kv_params.KVParams | None) -> tuple[StaticQuantizer, str]:
        cfg, kv = self.config, self.kv_dtype
        if kv == "fp16":
            return StaticQuantizer.identity(kv, cfg.num_layer, cfg.kv_head_num, device=self.device), "none needed"
        if self.settings.calculate_kv_scales:
            q = StaticQuantizer.identity(kv, cfg.num_layer, cfg.kv_head_num, dynamic=True, device=self.device)
            return q, "calculated on the fly from the first prompt (per layer, with headroom)"
        if explicit is not None:
            if explicit.kv_dtype != kv or explicit.k_scale.shape != (cfg.num_layer, cfg.kv_head_num):
                raise ValueError(
                    f"kv_params are {explicit.kv_dtype} {tuple(explicit.k_scale.shape)}, the engine needs {kv} "
                    f"({cfg.num_layer}, {cfg.kv_head_num})"
                )
            p, source = explicit, "given by the caller"
        else:
            p = kv_params.read(self.wdir, cfg, kv, self.kv_granularity)  # raises with the fix when missing/malformed
            name = kv_params.file_name(0, 0, kv, self.kv_granularity).replace("layers.0.", "layers.*.")
            source = f"loaded from {self.wdir}/{name.replace('.0.weight', '.*.weight')}"
        return StaticQuantizer(kv, p.k_scale, p.k_zp, p.v_scale, p.v_zp, device=self.device), source

    # ------------------------------------------------------------------------------------------
    def banner(self) -> str:
        cfg = self.config
        per_token = kv_bytes_per_token(cfg, quant.BYTES_PER_ELEM[self.kv_dtype])
        capacity = self.max_batch_size * self.session_len
        return (
            f"KV cache {self.kv_dtype} ({'int8 quant_policy 4' if self.kv_dtype == 'int8' else 'no quant_policy bit'}), "
            f"granularity {self.kv_granularity if self.kv_dtype != 'fp16' else '-'}, scales {self.scale_source}; "
            f"{per_token:.0f} bytes/token, capacity {self.max_batch_size} slots x {self.session_len} = "
            f"{capacity} tokens ({self.cache_bytes() / 2**20:.1f} MiB); use_context_fmha={self.use_context_fmha}, "
            f"compute {self.settings.dtype} on {self.device}"
        )

    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    def new_session(self) -> Session:
        if not self.free_slots:
            raise RuntimeError(
                f"all {self.max_batch_size} cache slots are in use; end a session or raise max_batch_size"
            )
        return Session(slot=self.free_slots.pop(0))

    def end_session(self, session: Session) -> None:
        if session.slot >= 0 and session.slot not in self.free_slots:
            self.free_slots.append(session.slot)
            self.free_slots.sort()
        session.slot, session.cached, session.pending, session.history = -1, 0, [], []

    def _check_length(self, session_tokens: int, new: int, max_tokens: int) -> None:
        if session_tokens + new + max_tokens > self.session_len:
            raise SessionLengthError(
                f"{session_tokens} tokens in the session + {new} new + max_tokens {max_tokens} "
                f"> session_len {self.session_len}; end the session or ask for fewer tokens"
            )

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, sessions: list[Session], token_lists: list[list[int]], all_logits: bool = False) -> torch.Tensor:
        """Append token_lists[b] to sessions[b]'s cache in one forward pass; logits (B, V) at each last token."""
        B, T = len(sessions), max(len(t) for t in token_lists)
        tokens = torch.zeros(B, T, dtype=torch.long)  # (B, T), right-padded
        for b, toks in enumerate(token_lists):
            tokens[b, : len(toks)] = torch.tensor(toks)
        batch = Batch(
            slots=torch.tensor([s.slot for s in sessions]),
            starts=torch.tensor([s.cached for s in sessions]),
            counts=[len(t) for t in token_lists],
        )
        logits = self.model.forward(
            tokens.to(self.device), self.cache, batch, use_context_fmha=self.use_context_fmha, all_logits=all_logits
        )
        for s, toks in zip(sessions, token_lists, strict=True):
            s.cached += len(toks)
        return logits.float().cpu()

    def _sample(self, logits: torch.Tensor, history: list[int], params, generator) -> int:
        from runtime.sampling import sample_next

        return sample_next(logits, history, params, generator)

    def stops(self, token: int, params) -> bool:
        """Does `token` end generation (EOS unless ignore_eos, or one of params.stop_token_ids)?"""
        return (not params.ignore_eos and token in self.eos_ids) or token in (params.stop_token_ids or ())

    def stream(self, session: Session, new_token_ids: list[int], params) -> Iterator[int]:
        """Prefill the new tokens, then yield generated token ids (see module docstring)."""
        if session.slot < 0:
            raise ValueError("this session was ended; start a new one with engine.new_session()")
        self._check_length(session.num_tokens, len(new_token_ids), params.max_tokens)
        if not new_token_ids and not session.pending:
            raise ValueError("stream needs at least one new token")
        return self._stream(session, list(new_token_ids), params)

    def _stream(self, session: Session, new: list[int], params) -> Iterator[int]:
        from runtime.sampling import make_generator

        generator = make_generator(params.seed)
        session.pending = session.pending + new
        session.history.extend(new)
        logits = self._feed_pending(session)
        for n in range(params.max_tokens):
            token = self._sample(logits, session.history, params, generator)
            session.pending = [token]
            session.history.append(token)
            yield token
            if self.stops(token, params) or n + 1 == params.max_tokens:
                return
            logits = self._feed_pending(session)

    def _feed_pending(self, session: Session) -> torch.Tensor:
        """Cache the session's pending tokens; they stay pending if the forward pass is interrupted (Ctrl-C)."""
        logits = self._step([session], [session.pending])[0]
        session.pending = []
        return logits

    def generate(self, prompts: list[list[int]], params: list, stop_check=None) -> list[list[int]]:
        """Generated token ids per prompt; prompts of different lengths share each forward pass.

        stop_check(b, generated_ids) -> bool may end sequence b early (e.g. on a stop string).
        """
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for p, sp in zip(prompts, params, strict=True):
            if not p:
                raise ValueError("empty prompt: give at least one token")
            self._check_length(0, len(p), sp.max_tokens)
        results: list[list[int]] = [[] for _ in prompts]
        wave = max(1, len(self.free_slots))
        for lo in range(0, len(prompts), wave):
            idx = list(range(lo, min(lo + wave, len(prompts))))
            check = None if stop_check is None else (lambda b, toks, idx=idx: stop_check(idx[b], toks))
            self._generate_wave([prompts[i] for i in idx], [params[i] for i in idx], [results[i] for i in idx], check)
        return results

    def _generate_wave(self, prompts, params, outs, stop_check) -> None:
        from runtime.sampling import make_generator

        sessions = [self.new_session() for _ in prompts]
        try:
            gens = [make_generator(sp.seed) for sp in params]
            for s, p in zip(sessions, prompts, strict=True):
                s.history = list(p)
            logits = self._step(sessions, [list(p) for p in prompts])  # (B, V)
            active = list(range(len(prompts)))
            while active:
                nxt, toks = [], []
                for row, b in enumerate(active):
                    token = self._sample(logits[row], sessions[b].history, params[b], gens[b])
                    outs[b].append(token)
                    sessions[b].history.append(token)
                    done = self.stops(token, params[b]) or len(outs[b]) == params[b].max_tokens
                    if not (done or (stop_check is not None and stop_check(b, outs[b]))):
                        nxt.append(b)
                        toks.append([token])
                active = nxt
                if active:
                    logits = self._step([sessions[b] for b in active], toks)
        finally:
            for s in sessions:
                self.end_session(s)

    def score(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) fp32 through a fresh cache in this engine's KV mode."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        B, T = token_ids.shape
        if T > self.session_len:
            raise SessionLengthError(f"{T} tokens > session_len {self.session_len}")
        sessions = [self.new_session() for _ in range(B)]
        try:
            return self._step(sessions, token_ids.tolist(), all_logits=True)
        finally:
            for s in sessions:
                self.end_session(s)


def _kernels(device: torch.device):
    """The CUDA kernels (CuPy, imported only here) on a GPU; None = the PyTorch/C++ CPU path."""
    if device.type != "cuda":
        return None
    import runtime.cuda

    return runtime.cuda


def _load_tokenizer(wdir):
    from transformers import AutoTokenizer

    tok_dir = wdir.parent / "tokenizer"
    if not tok_dir.is_dir():
        raise WorkspaceError(
            f"no tokenizer directory {tok_dir}; re-run python -m deploy (it copies the HF tokenizer files there)"
        )
    return AutoTokenizer.from_pretrained(tok_dir)
