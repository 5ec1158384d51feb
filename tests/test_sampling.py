"""Sampling functions against hand-computed examples; no model needed."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    greedy_rows,
    make_generator,
    sample_next,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


def test_params_defaults_and_validation():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (1.0, 1.0, -1, 1.0, 16)
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).is_greedy
    for bad in [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(repetition_penalty=0),
        dict(max_tokens=0),
        dict(stop=[""]),
        dict(stop_token_ids=[-1]),
    ]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_repetition_penalty_hand_values():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0])
    out = apply_repetition_penalty(logits, [0, 1, 1, 3], 2.0)  # token 1 twice: penalised once (a set)
    assert out.tolist() == [1.0, -2.0, 0.5, -6.0, 4.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, -3.0, 4.0]  # input untouched
    assert apply_repetition_penalty(logits, [0], 1.0) is logits
    assert apply_repetition_penalty(logits, [], 1.3) is logits
    # penalty < 1 encourages repetition: positive logits grow
    assert apply_repetition_penalty(logits, [4], 0.5)[4].item() == 8.0


def test_temperature_effect_on_probabilities():
    logits = torch.tensor([1.0, 2.0, 3.0])
    for t in (0.5, 1.0, 2.0):
        probs = torch.softmax(apply_temperature(logits, t), -1)
        z = sum(math.exp(x / t) for x in (1.0, 2.0, 3.0))
        expected = [math.exp(x / t) / z for x in (1.0, 2.0, 3.0)]
        assert probs.tolist() == pytest.approx(expected, rel=1e-6)
    # lower temperature sharpens: the top token's probability grows monotonically
    tops = [torch.softmax(apply_temperature(logits, t), -1)[2].item() for t in (2.0, 1.0, 0.5, 0.1)]
    assert tops == sorted(tops) and tops[-1] > 0.99
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


def test_top_k_mask():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 2.5])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [-INF, 3.0, -INF, -INF, 2.5]
    assert top_k_filter(logits, 0) is logits and top_k_filter(logits, -1) is logits
    assert top_k_filter(logits, 5) is logits
    # ties with the k-th largest are kept (as HF does)
    assert torch.isfinite(top_k_filter(torch.tensor([1.0, 2.0, 2.0, 0.0]), 2)).tolist() == [False, True, True, False]
    # batched (B, V)
    b = top_k_filter(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 1)
    assert torch.isfinite(b).tolist() == [[False, False, True], [True, False, False]]


def test_top_p_mask_smallest_set():
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])  # sorted: 0.4, 0.3, 0.15, 0.1, 0.05
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert keep(0.35) == [False, True, False, False, False]  # 0.4 >= 0.35 alone
    assert keep(0.6) == [False, True, False, True, False]  # 0.4 + 0.3 = 0.7 >= 0.6
    assert keep(0.72) == [False, True, False, True, True]  # 0.85 >= 0.72
    assert keep(0.9) == [True, True, False, True, True]  # 0.95 >= 0.9
    assert keep(0.99) == [True] * 5
    assert keep(1e-6) == [False, True, False, False, False]  # always at least one token
    assert top_p_filter(logits, 1.0) is logits
    kept = top_p_filter(logits, 0.6)
    assert kept[1].item() == logits[1].item() and kept[3].item() == logits[3].item()  # kept logits unchanged


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([1.0, 5.0, 4.0, -2.0])
    assert sample_next(logits, [], SamplingParams(temperature=0)) == 1
    # 5 / 2 = 2.5 < 4: the penalised token loses
    assert sample_next(logits, [1], SamplingParams(temperature=0, repetition_penalty=2.0)) == 2


def test_greedy_rows_equal_sample_next_row_by_row():
    """The engine's one argmax over a batch's greedy rows picks what sample_next picks for each row: ties (the first
    index), +-inf, NaN and huge values included; rows without params, sampled ones and penalised ones are left
    out."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g)
    logits[1, [7, 30]] = 9.0  # a tie: the first index
    logits[2, 11], logits[2, 40] = INF, 1e38
    logits[3, 5], logits[3, 6] = float("nan"), 50.0
    logits[4] = -INF
    logits[5, 2] = torch.finfo(torch.float32).max
    greedy = SamplingParams(temperature=0)
    want = {i: sample_next(logits[i], [], greedy) for i in range(6)}
    assert greedy_rows(logits, [greedy] * 6) == want
    others = [None, greedy, SamplingParams(temperature=0.7), SamplingParams(temperature=0, repetition_penalty=1.2)]
    assert greedy_rows(logits, [*others, greedy, None]) == {1: want[1], 4: want[4]}
    assert greedy_rows(logits, [None] * 6) == {}


def test_top_k_1_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(1000)
    best = int(logits.argmax())
    for _ in range(20):
        assert sample_next(logits, [], SamplingParams(temperature=1.5, top_k=1)) == best
        assert sample_next(logits, [], SamplingParams(temperature=1.5, top_p=1e-9)) == best


def test_seed_reproducible():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    runs = []
    for _ in range(2):
        g = make_generator(params.seed)
        runs.append([sample_next(logits, [], params, g) for _ in range(50)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 5  # really sampling, not collapsed to one token
    g = make_generator(8)
    assert [sample_next(logits, [], params, g) for _ in range(50)] != runs[0]
    assert make_generator(None) is None


def _chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


def test_sampling_frequencies_match_distribution():
    probs = [0.5, 0.25, 0.15, 0.1]
    logits = torch.tensor(probs).log()
    g = make_generator(1234)
    n = 4000
    counts = [0] * 4
    for _ in range(n):
        counts[sample_next(logits, [], SamplingParams(temperature=1.0), g)] += 1
    # chi-square with 3 degrees of freedom: 16.27 is the 0.999 quantile
    assert _chi_square(counts, probs) < 16.27, counts
    # with temperature 2 the distribution is p^(1/2) renormalised
    g = make_generator(99)
    counts = [0] * 4
    for _ in range(n):
        counts[sample_next(logits, [], SamplingParams(temperature=2.0), g)] += 1
    flat = [math.sqrt(p) for p in probs]
    flat = [f / sum(flat) for f in flat]
    assert _chi_square(counts, flat) < 16.27, counts
    assert _chi_square(counts, probs) > 50  # and clearly not the T=1 distribution


def test_top_k_then_top_p_renormalised_sampling():
    # top_k 3 keeps 0.4, 0.3, 0.15 (renormalised 0.47, 0.35, 0.18); top_p 0.8 then keeps the first two
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    g = make_generator(0)
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.8)
    counts = [0] * 5
    for _ in range(2000):
        counts[sample_next(probs.log(), [], params, g)] += 1
    assert counts[0] == counts[2] == counts[4] == 0
    assert _chi_square([counts[1], counts[3]], [4 / 7, 3 / 7]) < 10.83  # 1 dof, 0.999 quantile


def test_extreme_values_never_produce_nan():
    """A tiny temperature is greedy; a tiny repetition penalty saturates instead of overflowing to inf/NaN."""
    logits = torch.tensor([3.0, 1.0, -2.0, 0.5])
    assert sample_next(logits, [], SamplingParams(temperature=1e-40)) == 0
    g = torch.Generator().manual_seed(0)
    tok = sample_next(logits, [0, 1], SamplingParams(temperature=1.0, repetition_penalty=1e-40), g)
    assert tok in (0, 1)  # both penalised to the largest finite logit
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**70)
