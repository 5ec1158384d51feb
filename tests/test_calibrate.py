"""lite.calibrate CLI on a tiny model, its bad inputs, and the whole deploy → calibrate → kv_qparams flow (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lite import calibrate, kv_qparams
from lite import stats as stats_mod
from lite.datasets import get_calib_windows
from runtime import kv_params
from runtime.workspace import load_config

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = "/usr/share/debian-reference/ch0[1-5]*.html"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("calib") / "text.txt"
    f.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(200)))
    return f


def test_cli_upstream_spellings_matches_library(tiny_hf, text_file, tmp_path, capsys):
    model = tiny_hf("llama")
    work = tmp_path / "work"
    argv = [
        "--model",
        str(model),
        "--calib_dataset",
        str(text_file),
        "--calib_samples",
        "3",
        "--calib_seqlen",
        "32",
        "--work_dir",
        str(work),
        "--batch-size",
        "2",
        "--seed",
        "5",
    ]
    assert calibrate.main(argv) == 0
    assert "3 windows x 32 tokens (96 tokens)" in capsys.readouterr().out
    summary = json.loads((work / "calib_summary.json").read_text())
    assert summary == {
        "model": str(model),
        "dataset": str(text_file),
        "samples": 3,
        "seqlen": 32,
        "seed": 5,
        "tokens": 96,
    }
    kv = stats_mod.load(work)
    assert (kv.num_layer, kv.kv_heads, kv.head_dim) == (2, 2, 16)
    # the same windows through the library, one window per batch: identical statistics
    m, tok = calibrate.load_model(model)
    ref = calibrate.collect_stats(m, get_calib_windows(str(text_file), tok, 3, 32, seed=5), batch_size=1)
    for a, b in ((kv.key, ref.key), (kv.value, ref.value)):
        for name in ("max", "min", "absmax"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)
    # re-running overwrites the stats (atomically) and leaves no temp files
    assert calibrate.main(argv[:-2] + ["--seed", "6"]) == 0
    assert json.loads((work / "calib_summary.json").read_text())["seed"] == 6
    assert sorted(p.name for p in work.iterdir()) == ["calib_summary.json", "key_stats.pth", "value_stats.pth"]


BAD = [
    ("model", {"--model": "{tmp}/nowhere"}, r"--model .*nowhere: no config.json there"),
    (
        "seqlen_max_pos",
        {"--calib-seqlen": "100000"},
        r"--calib-seqlen 100000 exceeds the model's max_position_embeddings 512",
    ),
    ("hub_offline", {"--calib-dataset": "c4"}, r"needs the `datasets` package.*debian-reference"),
    ("missing_file", {"--calib-dataset": "{tmp}/missing.txt"}, r"neither a hub dataset"),
    ("too_short", {"--calib-seqlen": "500"}, r"small.txt: \d+ tokens, fewer than one window of --calib-seqlen 500"),
    ("batch", {"--batch-size": "0"}, r"--batch-size 0 must be positive"),
    ("cuda", {"--device": "cuda"}, r"--device cuda requested but torch sees no CUDA device"),
]


@pytest.mark.parametrize("name, change, match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_write_nothing(tiny_hf, tmp_path, capsys, monkeypatch, name, change, match):
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setitem(sys.modules, "datasets", None)  # the hub is unreachable, installed or not
    (tmp_path / "small.txt").write_text("only a few words here")
    work = tmp_path / "work"
    opts = {
        "--model": str(tiny_hf("llama")),
        "--calib-dataset": str(tmp_path / "small.txt"),
        "--calib-samples": "2",
        "--calib-seqlen": "4",
        "--work-dir": str(work),
    }
    opts.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    assert calibrate.main([x for kv in opts.items() for x in kv]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not work.exists()


def messages(stderr: str) -> list[str]:
    """stderr without progress bars (transformers' and ours)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "%|" not in ln]


def test_too_little_text_is_a_clean_note(tiny_hf, text_file, tmp_path, capsys):
    argv = ["--model", str(tiny_hf("llama")), "--calib-dataset", str(text_file), "--calib-samples", "1000"]
    assert calibrate.main(argv + ["--calib-seqlen", "32", "--work-dir", str(tmp_path / "w")]) == 0
    err = messages(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("note: ") and "fewer than --calib-samples 1000" in err[0], err


def test_only_our_notice_becomes_a_note(tiny_hf, text_file, tmp_path, capsys, monkeypatch):
    """Other libraries' warnings (transformers warns on every forward) keep their own filters and format."""
    import warnings

    from lite.datasets import FewerWindows

    def noisy(*args, **kwargs):
        for _ in range(3):
            warnings.warn("some library deprecation", FutureWarning, stacklevel=1)
        warnings.warn("too little text", FewerWindows, stacklevel=1)
        raise ValueError("stop here")

    monkeypatch.setattr(calibrate, "collect_stats", noisy)
    argv = ["--model", str(tiny_hf("llama")), "--calib-dataset", str(text_file), "--calib-samples", "1"]
    assert calibrate.main(argv + ["--calib-seqlen", "8", "--work-dir", str(tmp_path / "w")]) == 2
    err = messages(capsys.readouterr().err)
    assert [ln for ln in err if ln.startswith("note:")] == ["note: too little text"]
    assert not any("note: some library" in ln for ln in err)


def test_ctrl_c_writes_nothing_and_says_so(tiny_hf, text_file, tmp_path, capsys, monkeypatch):
    import os
    import signal

    def interrupted_run(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C in the middle of the forward passes
        raise AssertionError("SIGINT should have raised KeyboardInterrupt")

    monkeypatch.setattr(calibrate, "collect_stats", interrupted_run)
    work = tmp_path / "work"
    argv = ["--model", str(tiny_hf("llama")), "--calib-dataset", str(text_file), "--calib-samples", "2"]
    assert calibrate.main(argv + ["--calib-seqlen", "32", "--work-dir", str(work)]) == 130
    err = messages(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("interrupted: no statistics were written"), err
    assert not (work / "key_stats.pth").exists()


@pytest.mark.slow
def test_end_to_end_demo_model(demo_model, tmp_path, capsys):
    """deploy → calibrate (4 x 128 Debian tokens) → kv_qparams int8 tensor/head + fp8, config updated."""
    ws = tmp_path / "ws"
    subprocess.run(
        [sys.executable, "-m", "deploy", "smollm2", str(demo_model), "--dst-path", str(ws)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    wdir = ws / "triton_models" / "weights"
    work = tmp_path / "work"
    assert (
        calibrate.main(
            [
                "--model",
                str(demo_model),
                "--calib-dataset",
                DEBIAN,
                "--calib-samples",
                "4",
                "--calib-seqlen",
                "128",
                "--work-dir",
                str(work),
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    kv = stats_mod.load(work)
    assert (kv.num_layer, kv.kv_heads, kv.head_dim) == (30, 3, 64)
    assert (kv.key.absmax > 0).all() and (kv.key.max >= kv.key.min).all()

    # upstream spellings, int8 asymmetric per tensor, config edits printed only
    assert (
        kv_qparams.main(["--work_dir", str(work), "--turbomind_dir", str(wdir), "--kv_sym", "False", "--num_tp", "1"])
        == 0
    )
    assert "quant_policy = 4" in capsys.readouterr().out and load_config(wdir).quant_policy == 0
    assert (wdir / "layers.29.past_kv_scale.0.weight").stat().st_size == 16
    cfg = load_config(wdir)
    p = kv_params.read(wdir, cfg, "int8", "tensor")
    k_max, k_min = kv.key.max[3].amax(), kv.key.min[3].amin()
    assert p.k_scale[3, 0].item() == np.float32((k_max - k_min).item()) / np.float32(255)

    assert (
        kv_qparams.main(
            ["--work-dir", str(work), "--turbomind-dir", str(ws), "--granularity", "head", "--update-config"]
        )
        == 0
    )
    cfg = load_config(wdir)
    assert (cfg.quant_policy, cfg.kv_cache_dtype, cfg.kv_granularity) == (4, "int8", "head")
    assert (wdir / "layers.0.past_kv_scale_head.0.weight").stat().st_size == 16 * 3
    ph = kv_params.read(wdir, cfg, "int8", "head")
    assert (ph.k_scale <= p.k_scale + 1e-7).all()  # per-head ranges are never wider than the layer's

    assert (
        kv_qparams.main(
            ["--work-dir", str(work), "--turbomind-dir", str(wdir), "--kv-dtype", "fp8_e4m3", "--update-config"]
        )
        == 0
    )
    cfg = load_config(wdir)
    assert (cfg.quant_policy, cfg.kv_cache_dtype, cfg.kv_granularity) == (0, "fp8_e4m3", "tensor")
    pf = kv_params.read(wdir, cfg, "fp8_e4m3", "tensor")
    torch.testing.assert_close(pf.v_scale[:, 0], kv.value.absmax.amax(dim=(1, 2)) / 448, rtol=0, atol=0)
    assert {d for d, _ in kv_params.available(wdir, cfg)} == {"int8", "fp8_e4m3"}
