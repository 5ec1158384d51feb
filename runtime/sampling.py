"""Sampling: vLLM-shaped `SamplingParams` and the small pure functions that pick the next token.

Order of the steps in `sample_next` (as in vLLM and HF `generate`):
    logits (V,) fp32
      -> repetition penalty over the set of tokens already in the sequence (HF/CTRL:
         a positive logit is divided by the penalty, a negative one multiplied)
      -> temperature 0: argmax (greedy), done
      -> logits / temperature
      -> top-k: keep the k largest logits (ties with the k-th are kept)
      -> top-p: keep the smallest set of most likely tokens whose cumulative probability
         reaches top_p (always at least one token)
      -> softmax, one multinomial draw from the (optionally seeded) generator.

Every function takes logits with the vocabulary on the last axis and returns a new tensor;
none modifies its input. Filtered-out tokens get -inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SAMPLING_EPS = 1e-5  # temperatures below this are greedy
FINITE = 3.0e38  # logits are clamped here after penalty and temperature: a tiny divisor can't make inf/NaN


@dataclass
class SamplingParams:
    """Generation settings with vLLM's meanings.

    temperature 0 means greedy; top_k -1 or 0 and top_p 1.0 switch those filters off;
    repetition_penalty 1.0 is off. `stop` strings are cut from the text (by whoever detokenizes),
    `stop_token_ids` and EOS (unless `ignore_eos`) end generation. `seed` makes sampling reproducible.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # vLLM accepts a single string
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1] (1 = off)"),
            (self.top_k == -1 or self.top_k >= 0, "top_k", "must be -1 or 0 (off) or a positive count"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 = off)"),
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (
                self.seed is None or -(2**63) <= self.seed < 2**64,
                "seed",
                "must fit in 64 bits (torch.Generator.manual_seed)",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} = {getattr(self, name)!r}: {why}")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingParams.stop = {self.stop!r}: must be a list of non-empty strings")
        if self.stop_token_ids is not None and not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids = {self.stop_token_ids!r}: must be token ids >= 0")

    @property
    def is_greedy(self) -> bool:
        """temperature 0, or so close to it that dividing by it would overflow (vLLM's 1e-5 threshold)."""
        return self.temperature < SAMPLING_EPS


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A torch.Generator seeded with `seed`, or None (the global RNG) when seed is None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """HF/CTRL repetition penalty on logits (V,) over the set of tokens in `history`."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    idx = torch.as_tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    seen = logits[..., idx]
    # Dividing a positive logit and multiplying a negative one both make the token less likely for penalty > 1.
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    out = logits.clone()
    out[..., idx] = seen
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (temperature > 0; greedy is handled by the caller, not by dividing by 0)."""
    if temperature <= 0:
        raise ValueError(f"apply_temperature: temperature = {temperature} must be > 0 (use argmax for greedy)")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits on the last axis (ties with the k-th kept), -inf elsewhere; k <= 0 = off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose cumulative probability is >= p (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly ahead of each token
    drop_sorted = before >= p  # a token is needed only while the mass ahead of it is still short of p
    drop_sorted[..., 0] = False  # always keep the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def greedy_rows(logits: torch.Tensor, params: Sequence[SamplingParams | None]) -> dict[int, int]:
    """sample_next's pick for each row of logits (B, V) whose params (one per row; None: no token wanted) are
    greedy with no repetition penalty, in one reduction over all of them: {row: token}; the other rows are left to
    sample_next. A decode step's batch otherwise runs B argmax calls over the vocabulary (~70 us each on a 2-core
    CPU at V = 49152; this takes ~130 us for 8 rows, ~700 for 32)."""
    rows = [i for i, p in enumerate(params) if p is not None and p.is_greedy and p.repetition_penalty == 1.0]
    if not rows:
        return {}
    x = logits if rows == list(range(logits.shape[0])) else logits[rows]
    # max(dim).indices: torch.argmax's pick (the first of equal maxima; NaN wins), 2-3x faster on the CPU
    picked = x.float().clamp(-FINITE, FINITE).max(dim=-1).indices.tolist()
    return dict(zip(rows, picked, strict=True))


def sample_next(
    logits: torch.Tensor, history: Sequence[int], params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Pick the next token id from logits (V,) given the sequence so far (prompt + generated)."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty).clamp(-FINITE, FINITE)
    if params.is_greedy:
        return int(torch.argmax(logits))
    logits = apply_temperature(logits, params.temperature).clamp(-FINITE, FINITE)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)  # e.g. CUDA logits with a CPU generator
    return int(torch.multinomial(probs, 1, generator=generator))
