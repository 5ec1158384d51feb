"""lite.eval: metric helpers by hand, the fp16 perplexity against HF transformers, seeds, modes and CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lite import eval as ev
from runtime.kv_cache import DEFAULT_ROTATION

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"ppl", "ppl_change_pct", "top1_agreement", "kl", "max_abs_logit_diff", "bytes_per_token"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Real prose-like text (the repo's own sources), enough for a handful of short windows."""
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted((ROOT / "runtime").glob("*.py"))))
    return path


def _deploy(hf_dir: Path, dst: Path) -> Path:
    from deploy.convert import deploy

    return deploy("smollm2", hf_dir, dst, progress=False)


@pytest.fixture(scope="module")
def workspace(tiny_hf, tmp_path_factory) -> Path:
    """Tiny llama workspace with INT8 and FP8 E4M3 per-tensor scales (no per-head FP8 files)."""
    from runtime import kv_params
    from runtime.workspace import load_config, weights_dir

    ws = _deploy(tiny_hf("llama"), tmp_path_factory.mktemp("eval") / "ws")
    wdir, cfg = weights_dir(ws), load_config(ws)
    shape = (cfg.num_layer, cfg.kv_head_num)
    for kv, scale, zp in (("int8", 0.03, 0.01), ("fp8_e4m3", 4.0 / 448, 0.0)):
        p = kv_params.KVParams(
            kv,
            "tensor",
            torch.full(shape, scale),
            torch.full(shape, zp),
            torch.full(shape, scale),
            torch.full(shape, zp),
        )
        kv_params.write(wdir, cfg, p)
    return ws


# ----------------------------------------------------------------------------------------------
def test_metric_helpers_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])  # row 0: p = (1/4, 3/4)
    ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # row 0: p = (1/2, 1/2)
    logp, ref_logp = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    assert ev.nll(logp, torch.tensor([1, 0])).tolist() == pytest.approx(
        [-math.log(0.75), -math.log(1 / (1 + math.e**-2))]
    )
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3)
    assert float(ev.kl_divergence(ref_logp, logp)[0]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert ev.top1_matches(
        torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]]), torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 1.0]])
    ).tolist() == [True, False]
    assert ev.perplexity(torch.zeros(1, 4, 7), torch.zeros(1, 4, dtype=torch.long)) == pytest.approx(7.0)
    m = ev.Metrics()
    m.update(logits, ref, torch.tensor([1, 0]))
    assert m.count == 2 and m.agree == 0 and m.max_abs_logit_diff == pytest.approx(2.0)


def test_metrics_chunks_equal_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(0)
    z, zr = torch.randn(10, 50, generator=g), torch.randn(10, 50, generator=g)
    t = torch.randint(0, 50, (10,), generator=g)
    whole = ev.Metrics()
    whole.update(z, zr, t)
    monkeypatch.setattr(ev, "ROWS_PER_CHUNK", 3)
    parts = ev.Metrics()
    parts.update(z[:7], zr[:7], t[:7])
    parts.update(z[7:], zr[7:], t[7:])
    assert parts.count == whole.count == 10 and parts.agree == whole.agree
    assert parts.nll_sum == pytest.approx(whole.nll_sum) and parts.kl_sum == pytest.approx(whole.kl_sum)
    assert whole.ppl == pytest.approx(math.exp(float(F.cross_entropy(z.double(), t))))


def test_parse_modes():
    specs = ev.parse_modes("int8,fp8,fp8:dynamic,fp8_e5m2:unit,int8:head", "tensor")
    assert [(s.name, s.kv_dtype, s.variant) for s in specs] == [
        ("fp16", "fp16", ""),
        ("int8", "int8", "tensor"),
        ("fp8", "fp8_e4m3", "tensor"),
        ("fp8:dynamic", "fp8_e4m3", "dynamic"),
        ("fp8_e5m2:unit", "fp8_e5m2", "unit"),
        ("int8:head", "int8", "head"),
    ]
    assert [s.scales for s in specs] == [
        "-",
        "calibrated (tensor)",
        "calibrated (tensor)",
        "calculated on the fly",
        "unit (1.0)",
        "calibrated (head)",
    ]
    assert [s.name for s in ev.parse_modes("fp8,fp16", "head")] == ["fp16", "fp8"]
    assert ev.parse_modes("fp8,int8", "head", calculate_kv_scales=True)[1].variant == "dynamic"
    online = ev.parse_modes("int4_per_token_head,int4_per_token_head:norot,int8_per_token_head:rot", "head", True)
    assert [(s.name, s.kv_dtype, s.variant) for s in online[1:]] == [
        ("int4_per_token_head", "int4_per_token_head", "rot" if DEFAULT_ROTATION["int4_per_token_head"] else "norot"),
        ("int4_per_token_head:norot", "int4_per_token_head", "norot"),
        ("int8_per_token_head:rot", "int8_per_token_head", "rot"),
    ]
    assert online[3].scales == "per token-head, rotated" and online[2].scales == "per token-head"
    assert ev.parse_modes("fp8_per_token_head", "tensor", calculate_kv_scales=True)[1].variant in ("rot", "norot")
    for bad, message in (
        ("int4_per_token_head:head", "no calibrated scales"),
        ("int4", "unknown mode 'int4'"),
        ("int8:dynamic", "FP8 only"),
        ("fp16:head", "no variant"),
        ("fp8:block", "unknown variant"),
        ("int8,int8", "given twice"),
    ):
        with pytest.raises(ev.EvalError, match=message):
            ev.parse_modes(bad, "tensor")


def test_online_modes_score_close_to_fp16_and_count_their_bytes(workspace, text_file):
    doc = ev.evaluate(
        workspace,
        str(text_file),
        modes="int8_per_token_head:norot,int8_per_token_head:rot,int4_per_token_head",
        samples=2,
        seqlen=24,
        progress=False,
    )
    rows, cfg = doc["modes"], doc["cache"]
    assert list(rows) == ["fp16", "int8_per_token_head:norot", "int8_per_token_head:rot", "int4_per_token_head"]
    for name in list(rows)[1:]:
        assert rows[name]["kl"] < 0.05 and rows[name]["top1_agreement"] > 0.5
        assert cfg[name]["engine_cache_bytes"] == cfg[name]["formula_cache_bytes"]
        assert cfg[name]["scale_bytes"] == 0
    # D 16; INT4 in blocks of 32 (2 x D): K 8 + 4 * 16 / 32, V 8 + 4 -> 11 on average
    per_row = {"fp16": 2 * 16, "int8_per_token_head:rot": 16 + 4, "int4_per_token_head": 8 + 3}
    for name, b in per_row.items():
        assert rows[name]["bytes_per_token"] == 2 * 2 * 2 * b  # 2 (K, V) x 2 layers x 2 KV heads x row bytes


def test_build_engine_passes_kv_params(monkeypatch, workspace):
    import runtime.engine
    from runtime.workspace import load_config, weights_dir

    calls = []

    class Recorder:  # an Engine signature with the kv_params= / kv_granularity= arguments
        def __init__(
            self,
            workspace_path,
            *,
            kv_cache_dtype="auto",
            calculate_kv_scales=False,
            dtype="float32",
            max_batch_size=None,
            session_len=None,
            use_context_fmha=None,
            kv_params=None,
            kv_granularity=None,
            model=None,
            **budget,
        ):
            calls.append(
                dict(
                    model=model,
                    kv_cache_dtype=kv_cache_dtype,
                    dynamic=calculate_kv_scales,
                    params=kv_params,
                    granularity=kv_granularity,
                    slots=max_batch_size,
                    session_len=session_len,
                )
            )

    monkeypatch.setattr(runtime.engine, "Engine", Recorder)
    cfg = load_config(workspace)
    for spec in ev.parse_modes("int8,fp8:unit,fp8:dynamic", "tensor"):
        params = ev.mode_params(spec, weights_dir(workspace), cfg)
        ev.build_engine(workspace, spec, params, dtype="float32", batch_size=3, seqlen=20, use_context_fmha=0)
    fp16, int8, unit, dynamic = calls
    assert (
        fp16["params"] is None and fp16["kv_cache_dtype"] == "fp16" and (fp16["slots"], fp16["session_len"]) == (3, 20)
    )
    assert int8["granularity"] == "tensor" and torch.allclose(int8["params"].k_scale, torch.tensor(0.03))
    assert unit["kv_cache_dtype"] == "fp8_e4m3" and bool((unit["params"].k_scale == 1).all())
    assert dynamic["dynamic"] and dynamic["params"] is None


def test_same_text(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    (work / "calib_summary.json").write_text(json.dumps({"dataset": str(tmp_path)}))
    assert ev.same_text("c4", "c4") and not ev.same_text("c4", "wikitext2") and not ev.same_text("c4", None)
    assert ev.same_text(str(text), str(tmp_path))  # the eval file lies inside the calibration directory
    assert ev.same_text(str(text), str(work))  # the work dir recorded that directory
    assert not ev.same_text("wikitext2", str(work))
    assert ev.same_text(str(tmp_path / "*.txt"), str(text))  # a glob naming the same file
    other = tmp_path / "b.txt"
    other.write_text("y")
    assert not ev.same_text(str(other), str(text))


def test_fp16_ppl_equals_transformers_and_is_seeded(workspace, tiny_hf, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lite.datasets import get_calib_windows

    kw = dict(modes="fp16,int8,fp8_e4m3:unit", samples=3, seqlen=24, batch_size=2, seed=1, progress=False)
    doc = ev.evaluate(workspace, str(text_file), **kw)
    assert list(doc["modes"]) == ["fp16", "int8", "fp8_e4m3:unit"]
    assert all(set(row) == KEYS for row in doc["modes"].values())
    assert doc["samples"] == 3 and doc["seqlen"] == 24 and doc["positions"] == 3 * 23
    assert doc["scales"] == {"fp16": "-", "int8": "calibrated (tensor)", "fp8_e4m3:unit": "unit (1.0)"}

    # independent reference: HF transformers in fp32 on the same seeded windows
    tok = AutoTokenizer.from_pretrained(Path(workspace) / "triton_models" / "tokenizer")
    windows = get_calib_windows(str(text_file), tok, 3, 24, seed=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows).logits  # (3, 24, V)
    ref_ppl = math.exp(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())))
    fp16 = doc["modes"]["fp16"]
    assert fp16["ppl"] == pytest.approx(ref_ppl, rel=2e-3)
    assert (fp16["ppl_change_pct"], fp16["top1_agreement"], fp16["kl"], fp16["max_abs_logit_diff"]) == (0, 1, 0, 0)
    assert doc["modes"]["int8"]["kl"] > 0 and doc["modes"]["int8"]["max_abs_logit_diff"] > 0
    assert doc["modes"]["int8"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 1  # 2 layers, 2 KV heads, D 16, 1 byte
    assert fp16["bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    # the engine's pool: one 64-token block for each of the batch's 2 windows of 24 tokens, 128 B/token,
    # + fp32 (4, layers, KV heads) parameters
    assert doc["cache"]["int8"]["kv_cache_tokens"] == 2 * 64
    assert doc["cache"]["int8"]["engine_cache_bytes"] == 2 * 64 * 128 + 16 * 2 * 2

    again = ev.evaluate(workspace, str(text_file), **kw)
    assert again["modes"] == doc["modes"]
    other = ev.evaluate(workspace, str(text_file), **{**kw, "seed": 2, "modes": "fp16"})
    assert other["modes"]["fp16"]["ppl"] != fp16["ppl"]


def test_use_context_fmha_1_hides_the_cache_dtype(workspace, text_file):
    with pytest.warns(UserWarning, match="never reaches the scored logits"):
        doc = ev.evaluate(
            workspace, str(text_file), modes="fp16,int8", samples=2, seqlen=16, use_context_fmha=1, progress=False
        )
    assert doc["modes"]["int8"]["kl"] == 0 and doc["modes"]["int8"]["top1_agreement"] == 1


def test_cli_writes_report(workspace, text_file, tmp_path, capsys):
    rc = ev.main(
        [
            str(workspace),
            "--dataset",
            str(text_file),
            "--samples",
            "2",
            "--seqlen",
            "16",
            "--modes",
            "fp8:dynamic,int8",
            "--out",
            str(tmp_path),
            "--calib-dataset",
            str(text_file.parent),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert "numbers are optimistic" in captured.err
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert list(doc["modes"]) == ["fp16", "fp8:dynamic", "int8"]
    assert doc["scales"]["fp8:dynamic"] == "calculated on the fly"
    assert "fp8:dynamic" in captured.out and "calculated on the fly" in captured.out
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "fp16,int3"], "unknown mode 'int3'"),
        (
            ["--modes", "fp8:head"],
            "past_kv_scale_fp8_e4m3_head.0.weight, which is missing; the tensor granularity's fp8_e4m3 files",
        ),
        (["--seqlen", "1"], "--seqlen (1) >= 2"),
    ],
)
def test_cli_errors(workspace, text_file, args, message, capsys):
    assert ev.main([str(workspace), "--dataset", str(text_file), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_bad_workspace(tmp_path, text_file, capsys):
    assert ev.main([str(tmp_path), "--dataset", str(text_file)]) == 2
    assert "no config.ini under" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_model_fp16_matches_transformers(demo_model, tmp_path, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lite.datasets import get_calib_windows

    ws = _deploy(demo_model, tmp_path / "ws")
    doc = ev.evaluate(ws, str(text_file), modes="fp16,fp8:dynamic,fp8:unit", samples=2, seqlen=48, progress=False)
    tok = AutoTokenizer.from_pretrained(ws / "triton_models" / "tokenizer")
    windows = get_calib_windows(str(text_file), tok, 2, 48, seed=0)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows).logits
    ref_ppl = math.exp(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())))
    assert doc["modes"]["fp16"]["ppl"] == pytest.approx(ref_ppl, rel=2e-3)
    for mode in ("fp8:dynamic", "fp8:unit"):  # quantized, so different from fp16, yet close
        assert 0 < doc["modes"][mode]["kl"] < 0.1 and doc["modes"][mode]["top1_agreement"] > 0.8


def test_cli_default_out_dir_and_where_files_went(workspace, text_file, tmp_path, capsys, monkeypatch):
    """Without --out the report still goes somewhere (./eval_out), and the command says where."""
    monkeypatch.chdir(tmp_path)
    assert ev.main([str(workspace), "--dataset", str(text_file), "--samples", "2", "--seqlen", "16"]) == 0
    out = capsys.readouterr().out
    assert "wrote eval_out/eval.json and eval_out/eval.png" in out
    assert json.loads((tmp_path / "eval_out" / "eval.json").read_text())["samples"] == 2
    assert sorted(p.name for p in (tmp_path / "eval_out").iterdir()) == ["eval.json", "eval.png"]


def test_plot_title_names_the_dataset_and_the_calibration_text(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "calib_summary.json").write_text(json.dumps({"dataset": "/usr/share/debian-reference/ch0[1-4].en.html"}))
    doc = {
        "model_name": "smollm2",
        "samples": 8,
        "seqlen": 512,
        "dataset": "/usr/share/doc/debian/FAQ/*.en.html",
        "use_context_fmha": 0,
        "calib_dataset": str(work),
    }
    title = ev.plot_title(doc)
    assert "debian/FAQ/*.en.html" in title and "8 x 512" in title
    assert "calibrated on .../share/debian-reference/ch0[1-4].en.html" in title
    assert "calibrated" not in ev.plot_title({**doc, "calib_dataset": None})
    assert ev.dataset_label("wikitext2") == "wikitext2"


def test_ctrl_c_writes_nothing_and_says_so(workspace, text_file, tmp_path, capsys, monkeypatch):
    import os
    import signal

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT should have raised KeyboardInterrupt")

    monkeypatch.setattr(ev, "evaluate", interrupted)
    assert ev.main([str(workspace), "--dataset", str(text_file), "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"interrupted: nothing was written to {tmp_path / 'o'}"), err
    assert not (tmp_path / "o").exists()
