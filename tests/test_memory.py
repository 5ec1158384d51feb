"""lite.memory: the KV formula by hand, the runtime's allocated cache, the published internlm-7b deltas, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lite import memory
from lite.memory import NAMED_SHAPES, MiB

INTERNLM = NAMED_SHAPES["internlm-chat-7b"]


@pytest.fixture(scope="module")
def workspace(tiny_hf, tmp_path_factory):
    from deploy.convert import deploy

    return deploy("smollm2", tiny_hf("llama"), tmp_path_factory.mktemp("mem") / "ws", progress=False)


def test_bytes_per_token_by_hand():
    # 2 (K and V) * 32 layers * 32 heads * 128 channels * bytes/elem
    assert memory.bytes_per_token(INTERNLM, "fp16") == 2 * 32 * 32 * 128 * 2 == 524288
    for kv in ("int8", "fp8_e4m3", "fp8_e5m2"):
        assert memory.bytes_per_token(INTERNLM, kv) == 262144
    assert memory.scale_bytes(INTERNLM, "fp16") == 0
    assert memory.scale_bytes(INTERNLM, "int8") == 4 * 32 * 32 * 4


def test_online_bytes_per_token_count_the_scale_and_zero_of_each_row():
    # a row (one token, one KV head, K or V): data + fp16 (scale, zero) = 4 B, inside the blocks; INT4 keys:
    # a (scale, zero) per channel per block of 64 rows = 4 * 128 / 64 = 8 B per row, values 4 B: 6 B on average
    row = {"int8_per_token_head": 128 + 4, "fp8_per_token_head": 128 + 4, "int4_per_token_head": 64 + 6}
    for kv, b in row.items():
        assert memory.bytes_per_token(INTERNLM, kv) == 2 * 32 * 32 * b
        assert memory.scale_bytes(INTERNLM, kv) == 0  # nothing per layer outside the pool


@pytest.mark.parametrize("kv", ["int8_per_token_head", "int4_per_token_head"])
def test_online_measured_cache_equals_formula(kv):
    data, params, device = memory.measure_cache(INTERNLM, kv, 2, 64)
    assert device == "cpu" and params == 0
    assert data == 2 * 64 * memory.bytes_per_token(INTERNLM, kv)  # data and parameter pools together


def test_internlm_weights_from_the_table():
    # embedding + output 2 * 103168 * 4096; per layer: qkv 4096*12288 + 12288, wo 4096*4096 + 4096,
    # w1/w3/w2 3 * 4096*11008, two norms 2 * 4096; final norm 4096. fp16: 2 bytes each.
    per_layer = 4096 * 12288 + 12288 + 4096 * 4096 + 4096 + 3 * 4096 * 11008 + 2 * 4096
    params = 2 * 103168 * 4096 + 32 * per_layer + 4096
    assert memory.weight_bytes(INTERNLM) == 2 * params
    assert 13.5 < memory.weight_bytes(INTERNLM) / 2**30 < 13.8


@pytest.mark.parametrize("batch, published", [(8, -4096), (16, -8224), (32, -16448), (48, -24672)])
def test_published_int8_deltas(batch, published):
    rows = memory.report(INTERNLM, ["fp16", "int8"], [batch], 2056, memory.weight_bytes(INTERNLM), measure=False)
    delta = rows[1].delta_vs_fp16_mib[0]
    scales = 4 * 32 * 32 * 4 / MiB  # INT8 adds 16 KiB of per-head fp32 parameters once per cache
    # per session the saving is 2*32*32*S*128*1 B = S/4 MiB: 514 at S = 2056
    assert delta == pytest.approx(-batch * 514 + scales, abs=1e-9)
    if batch == 8:  # the published -4096 is S = 2048: exactly 512 MiB per session
        rows = memory.report(INTERNLM, ["fp16", "int8"], [8], 2048, 0, measure=False)
        assert rows[1].delta_vs_fp16_mib[0] == pytest.approx(published + scales, abs=1e-9)
        assert round(delta) == -4112
    else:
        assert round(delta) == published
    implied = {8: "2048", 16: "2056", 32: "2056", 48: "2056"}[batch]
    line = memory.published_check([batch])[0]
    assert f"published {published} MiB implies session_len {implied}" in line


def test_internlm_batch48_allocated_on_meta_equals_formula():
    data, params, device = memory.measure_cache(INTERNLM, "int8", 48, 2056)
    assert device == "meta"
    assert data == 48 * 2056 * 2 * 32 * 32 * 128
    assert params == 4 * 32 * 32 * 4


def test_workspace_measured_cache_equals_formula(workspace):
    from runtime.workspace import load_config, weights_dir

    cfg = load_config(workspace)
    L, H, D = cfg.num_layer, cfg.kv_head_num, cfg.size_per_head
    weights = sum(p.stat().st_size for p in weights_dir(workspace).glob("*.weight"))
    assert memory.weight_bytes(cfg, weights_dir(workspace)) == weights
    rows = memory.report(cfg, ["fp16", "int8", "fp8_e4m3"], [1, 3], 40, weights, budget_gib=0.05)
    for row, elem in zip(rows, (2, 1, 1), strict=True):
        per_session = 2 * L * H * D * elem * 40
        assert row.bytes_per_session == per_session
        assert row.measured_device == ["cpu", "cpu"]
        for b, total, measured in zip((1, 3), row.totals, row.measured, strict=True):
            scales = 0 if elem == 2 else 16 * L * H
            assert total == weights + b * per_session + scales
            assert measured == weights + b * per_session + 16 * L * H  # the runtime holds fp16's identity params too
        assert row.sessions_in_budget == int((0.05 * 2**30 - weights - (0 if elem == 2 else 16 * L * H)) // per_session)
    # the allocated tensors themselves: dtype and shape of the runtime's cache
    from runtime.kv_cache import KVCache, StaticQuantizer

    cache = KVCache(L, 3, H, 40, D, StaticQuantizer.identity("int8", L, H))
    assert cache.k[0].dtype == torch.int8 and cache.k[0].shape == (3, H, 40, D)
    assert memory.measure_cache(cfg, "int8", 3, 40)[0] == sum(t.nbytes for t in cache.k + cache.v)


def test_cli_shape_writes_json_and_png(tmp_path, capsys):
    rc = memory.main(["--shape", "internlm-chat-7b", "--batch", "8,48", "--budget-gib", "80", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "implies session_len 2048" in out and "-24672" in out
    doc = json.loads((tmp_path / "memory.json").read_text())
    assert doc["modes"]["int8"]["bytes_per_token"] == 262144
    assert doc["modes"]["fp16"]["sessions_in_budget"] == math.floor(
        (80 * 2**30 - memory.weight_bytes(INTERNLM)) / (524288 * 2056)
    )
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_custom_shape(capsys):
    assert memory.main(["--shape", "2,4,64", "--batch", "2", "--session-len", "100"]) == 0
    assert f"{2 * 2 * 4 * 64 * 2:>9}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "nope"], "--shape 'nope'"),
        ([], "give a WORKSPACE or --shape"),
        (["--shape", "internlm-chat-7b", "--modes", "int4"], "unknown int4"),
        (["--shape", "internlm-chat-7b", "--batch", "8,x"], "--batch '8,x'"),
        (["/nonexistent/ws"], "no config.ini under /nonexistent/ws"),
    ],
)
def test_cli_errors(argv, message, capsys):
    assert memory.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_plot_keeps_int8_and_fp8_lines_apart():
    """INT8 and FP8 have the same bytes, so their lines coincide: they must differ in style and say so."""
    from lite.plots import _pyplot, draw_memory

    plt = _pyplot()
    rows = memory.report(INTERNLM, ["fp16", "int8", "fp8_e4m3"], [8, 16], 2056, 0, measure=False)
    fig, ax = plt.subplots()
    try:
        draw_memory(ax, rows, [8, 16], 0)
        lines = {ln.get_label().split()[0]: ln for ln in ax.get_lines()}
        int8, fp8 = lines["int8"], lines["fp8_e4m3"]
        assert list(int8.get_ydata()) == list(fp8.get_ydata())
        assert (int8.get_linestyle(), int8.get_marker()) != (fp8.get_linestyle(), fp8.get_marker())
        assert "same as int8" in fp8.get_label() and "same as" not in int8.get_label()
    finally:
        plt.close(fig)


def test_cli_without_out_says_no_files(capsys):
    assert memory.main(["--shape", "2,4,64", "--batch", "2", "--session-len", "100", "--no-measure"]) == 0
    assert "no files written; --out DIR" in capsys.readouterr().out
