"""lite.stats / lite.calibrate capture: recorded K/V are HF's post-RoPE cache entries; reductions; file I/O."""

from __future__ import annotations

import pytest
import torch

from lite import stats as stats_mod
from lite.calibrate import collect_stats, load_model


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    model, _ = load_model(tiny_hf("llama"), "cpu")  # 2 layers, 4 heads, 2 kv heads (GQA), head_dim 16
    return model


def windows(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n, seqlen), generator=g)


def rope_by_hand(k: torch.Tensor, theta: float) -> torch.Tensor:
    """HF rotate_half RoPE written out: k (B, H, T, D), positions 0..T-1."""
    D, T = k.shape[-1], k.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None]  # (T, D/2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)  # (T, D)
    x1, x2 = k[..., : D // 2], k[..., D // 2 :]
    return k * cos + torch.cat([-x2, x1], -1) * sin


def test_capture_equals_hf_cache_and_hand_rope(tiny):
    ids = windows(2, 24)
    seen = {}
    collect_stats(tiny, ids, batch_size=2, on_kv=lambda i, k, v: seen.__setitem__(i, (k.clone(), v.clone())))
    with torch.no_grad():
        ref = tiny(input_ids=ids, use_cache=True).past_key_values  # HF's own DynamicCache
    cfg = tiny.config
    for i in range(cfg.num_hidden_layers):
        k, v = seen[i]
        assert k.shape == (2, cfg.num_key_value_heads, 24, 16)  # (B, H_kv, T, D): before any GQA repeat
        assert torch.equal(k, ref.layers[i].keys)
        assert torch.equal(v, ref.layers[i].values)
    # layer 0 independently: k_proj / v_proj of the normed embeddings, RoPE by hand
    with torch.no_grad():
        layer = tiny.model.layers[0]
        x = layer.input_layernorm(tiny.model.embed_tokens(ids))  # (B, T, hidden)
        k0 = layer.self_attn.k_proj(x).view(2, 24, 2, 16).transpose(1, 2)
        v0 = layer.self_attn.v_proj(x).view(2, 24, 2, 16).transpose(1, 2)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
    torch.testing.assert_close(seen[0][0], rope_by_hand(k0, theta), rtol=1e-5, atol=1e-5)
    assert torch.equal(seen[0][1], v0)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_capture_other_architectures(tiny_hf, arch):
    """Sliding-window (mistral) and qkv-bias (qwen2) models hand the capture cache their exact cache entries too."""
    model, _ = load_model(tiny_hf(arch), "cpu")
    ids = windows(2, 20, seed=2)
    seen = {}
    kv = collect_stats(model, ids, batch_size=2, on_kv=lambda i, k, v: seen.setdefault(i, []).append((k, v)))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True).past_key_values
    for i in range(model.config.num_hidden_layers):
        assert torch.equal(torch.cat([k for k, _ in seen[i]]), ref.layers[i].keys)
        assert torch.equal(torch.cat([v for _, v in seen[i]]), ref.layers[i].values)
        assert torch.equal(kv.value.min[i], ref.layers[i].values.amin(dim=(0, 2)))


def test_stats_match_direct_reduction_over_windows_and_batches(tiny):
    ids = windows(5, 16, seed=1)
    kv = collect_stats(tiny, ids, batch_size=2)  # batches of 2, 2, 1
    with torch.no_grad():  # HF's own cache, same batching (a different batch size may change the GEMM's last bits)
        caches = [tiny(input_ids=ids[b : b + 2], use_cache=True).past_key_values for b in (0, 2, 4)]
    keys = [torch.cat([c.layers[i].keys for c in caches]) for i in range(2)]  # each (5, H_kv, 16, D)
    values = [torch.cat([c.layers[i].values for c in caches]) for i in range(2)]
    assert kv.layer_names == ["model.layers.0", "model.layers.1"]
    for i in range(2):
        for got, x in ((kv.key, keys[i]), (kv.value, values[i])):
            assert torch.equal(got.max[i], x.amax(dim=(0, 2)))
            assert torch.equal(got.min[i], x.amin(dim=(0, 2)))
            assert torch.equal(got.absmax[i], x.abs().amax(dim=(0, 2)))
            assert got.max.dtype == torch.float32


def test_accumulator_fp16_input_kept_fp32():
    acc = stats_mod.StatsAccumulator(1, 2, 4)
    k = torch.tensor([[[[1.5, -2.0, 3.0, 0.0]], [[60000.0, 1.0, -1.0, 2.0]]]], dtype=torch.float16)  # (1, 2, 1, 4)
    acc.update(0, k, -k)
    kv = acc.result()
    assert kv.key.max.dtype == torch.float32
    assert torch.equal(kv.key.max[0], k[0, :, 0].float())
    assert torch.equal(kv.value.absmax[0], k[0, :, 0].float().abs())
    with pytest.raises(ValueError, match=r"expected K/V of shape \(B, 2, T, 4\)"):
        acc.update(0, torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))


def test_accumulator_requires_every_layer():
    acc = stats_mod.StatsAccumulator(2, 1, 2)
    acc.update(0, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    with pytest.raises(RuntimeError, match=r"layers \[1\]"):
        acc.result()


def random_stats(L=3, H=2, D=4, seed=0) -> stats_mod.KVStats:
    g = torch.Generator().manual_seed(seed)

    def one():
        a, b = torch.randn(L, H, D, generator=g), torch.randn(L, H, D, generator=g)
        mx, mn = torch.maximum(a, b), torch.minimum(a, b)
        return stats_mod.Stats(mx, mn, torch.maximum(mx.abs(), mn.abs()))

    return stats_mod.KVStats(one(), one(), [stats_mod.layer_name(i) for i in range(L)])


def test_save_load_roundtrip_upstream_layout(tmp_path):
    kv = random_stats()
    summary = stats_mod.CalibSummary("m", "d", 4, 128, 0, 512)
    stats_mod.save(tmp_path, kv, summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib_summary.json", "key_stats.pth", "value_stats.pth"]
    raw = torch.load(tmp_path / "key_stats.pth", weights_only=True)
    assert list(raw) == ["max", "min", "absmax"]
    assert list(raw["max"]) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert raw["min"]["model.layers.1"].shape == (2, 4) and raw["min"]["model.layers.1"].dtype == torch.float32
    back = stats_mod.load(tmp_path)
    for a, b in ((kv.key, back.key), (kv.value, back.value)):
        for name in ("max", "min", "absmax"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert stats_mod.load_summary(tmp_path) == summary


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("absmax"), r"expected a dict with keys \['max', 'min', 'absmax'\]"),
        (lambda d: d["min"].pop("model.layers.1"), r"'min' must hold the same layers"),
        (
            lambda d: d["absmax"].__setitem__("model.layers.0", torch.zeros(3, 4)),
            r"\['absmax'\]\['model.layers.0'\] "
            r"has shape \(3, 4\)",
        ),
        (
            lambda d: d["max"]["model.layers.2"].__setitem__((0, 0), float("nan")),
            r"\['max'\]\['model.layers.2'\] has "
            r"non-finite",
        ),
        (
            lambda d: d["min"]["model.layers.0"].__setitem__((1, 1), 99.0),
            r"model.layers.0 head 1 channel 1 has min > max",
        ),
    ],
)
def test_load_rejects_bad_files(tmp_path, mutate, match):
    stats_mod.save(tmp_path, random_stats())
    raw = torch.load(tmp_path / "value_stats.pth", weights_only=True)
    mutate(raw)
    torch.save(raw, tmp_path / "value_stats.pth")
    with pytest.raises(stats_mod.StatsError, match=match) as e:
        stats_mod.load(tmp_path)
    assert "value_stats.pth" in str(e.value) and "re-run python -m lite.calibrate" in str(e.value)


def test_load_missing_and_mismatched(tmp_path):
    with pytest.raises(stats_mod.StatsError, match=r"key_stats.pth is missing; re-run python -m lite.calibrate"):
        stats_mod.load(tmp_path)
    stats_mod.save(tmp_path, random_stats(L=3))
    other = tmp_path / "other"
    stats_mod.save(other, random_stats(L=2))
    (other / "value_stats.pth").replace(tmp_path / "value_stats.pth")
    with pytest.raises(stats_mod.StatsError, match=r"do not match"):
        stats_mod.load(tmp_path)
    (tmp_path / "key_stats.pth").write_bytes(b"garbage")
    with pytest.raises(stats_mod.StatsError, match=r"not a readable stats file"):
        stats_mod.load(tmp_path)
