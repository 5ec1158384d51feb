"""lite.kv_qparams: parameter files bit-exact against hand-written formulas; every bad input leaves the workspace as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lite import kv_qparams
from lite import stats as stats_mod
from runtime import kv_params
from runtime.workspace import WorkspaceConfig, load_config, save_config

L, H, D = 3, 4, 8


def make_workspace(root: Path, tp: int = 1, **overrides) -> Path:
    """A weights-free workspace: only triton_models/weights/config.ini."""
    wdir = root / "ws" / "triton_models" / "weights"
    wdir.mkdir(parents=True)
    kw = dict(
        model_name="smollm2",
        head_num=8,
        kv_head_num=H,
        size_per_head=D,
        vocab_size=100,
        num_layer=L,
        rotary_embedding=D,
        rope_theta=10000.0,
        inter_size=32,
        norm_eps=1e-5,
        attn_bias=0,
        start_id=1,
        end_id=2,
        tensor_para_size=tp,
    )
    kw.update(overrides)
    save_config(WorkspaceConfig(**kw), wdir)
    return wdir


def make_stats(work_dir: Path, seed: int = 0, num_layer: int = L, heads: int = H, dim: int = D) -> dict:
    """Random stats saved through lite.stats; returns them as float32 numpy arrays (L, H, D) for the hand formulas."""
    g = torch.Generator().manual_seed(seed)
    out, kv = {}, []
    for which in ("k", "v"):
        a = torch.randn(num_layer, heads, dim, generator=g) * 3 + 0.5
        b = torch.randn(num_layer, heads, dim, generator=g) * 3 - 0.5
        mx, mn = torch.maximum(a, b), torch.minimum(a, b)
        amax = torch.maximum(mx.abs(), mn.abs())
        kv.append(stats_mod.Stats(mx, mn, amax))
        out[which] = {"max": mx.numpy(), "min": mn.numpy(), "absmax": amax.numpy()}
    stats_mod.save(work_dir, stats_mod.KVStats(*kv, [stats_mod.layer_name(i) for i in range(num_layer)]))
    return out


def expected(st: dict, tp: int, kv_dtype: str, granularity: str, sym: bool) -> np.ndarray:
    """Hand formulas in numpy float32 -> array (L, tp, 4, n) of [k_scale, k_zp, v_scale, v_zp]."""
    hr = H // tp
    out = []
    for i in range(L):
        ranks = []
        for r in range(tp):
            rows = []
            for which in ("k", "v"):
                s = {k: v[i, r * hr : (r + 1) * hr] for k, v in st[which].items()}  # (hr, D)
                ax = None if granularity == "tensor" else 1
                mx, mn, amax = s["max"].max(axis=ax), s["min"].min(axis=ax), s["absmax"].max(axis=ax)
                mx, mn, amax = (np.atleast_1d(np.float32(x)) for x in (mx, mn, amax))
                if kv_dtype == "int8" and not sym:
                    scale, zp = (mx - mn) / np.float32(255), (mx + mn) / np.float32(2)
                elif kv_dtype == "int8":
                    scale, zp = amax / np.float32(127), np.zeros_like(amax)
                else:
                    fmax = np.float32({"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[kv_dtype])
                    scale, zp = amax / fmax, np.zeros_like(amax)
                rows += [scale.astype(np.float32), zp.astype(np.float32)]
            ranks.append(np.stack(rows))  # (4, n)
        out.append(ranks)
    return np.array(out, dtype=np.float32)


CASES = [
    (tp, dt, g, sym)
    for tp in (1, 2)
    for g in ("tensor", "head")
    for dt, sym in (("int8", False), ("int8", True), ("fp8_e4m3", False), ("fp8_e5m2", False))
]


@pytest.mark.parametrize("tp, kv_dtype, granularity, sym", CASES)
def test_files_bit_exact(tmp_path, tp, kv_dtype, granularity, sym):
    wdir = make_workspace(tmp_path, tp=tp)
    st = make_stats(tmp_path / "work")
    kv_qparams.write_kv_qparams(
        tmp_path / "work", wdir, kv_sym=sym, num_tp=tp, kv_dtype=kv_dtype, granularity=granularity, echo=lambda s: None
    )
    want = expected(st, tp, kv_dtype, granularity, sym)
    n = 1 if granularity == "tensor" else H // tp
    suffix = ("" if kv_dtype == "int8" else "_" + kv_dtype) + ("_head" if granularity == "head" else "")
    for i in range(L):
        for r in range(tp):
            path = wdir / f"layers.{i}.past_kv_scale{suffix}.{r}.weight"
            assert path.stat().st_size == 16 * n
            got = np.fromfile(path, dtype="<f4").reshape(4, n)  # little-endian float32, rows k_s, k_zp, v_s, v_zp
            np.testing.assert_array_equal(got, want[i, r])
            assert path.read_bytes() == want[i, r].astype("<f4").tobytes()
    if sym or kv_dtype != "int8":
        assert (want[:, :, [1, 3]] == 0).all()
    # the runtime reads them back (expanded per head)
    back = kv_params.read(wdir, load_config(wdir), kv_dtype, granularity)
    assert back.k_scale.shape == (L, H)
    assert config_unchanged(wdir)


def config_unchanged(wdir: Path) -> bool:
    cfg = load_config(wdir)
    return (cfg.quant_policy, cfg.kv_cache_dtype, cfg.kv_granularity) == (0, "fp16", "tensor")


def test_tp2_tensor_ranks_differ_and_cover_own_heads(tmp_path):
    wdir = make_workspace(tmp_path, tp=2)
    st = make_stats(tmp_path / "work")
    st["k"]["max"][0, 2:] += 100.0  # only rank 1's heads
    st["k"]["absmax"][0, 2:] += 100.0
    torch.save(
        {k: {f"model.layers.{i}": torch.from_numpy(v[i]) for i in range(L)} for k, v in st["k"].items()},
        tmp_path / "work" / "key_stats.pth",
    )
    kv_qparams.write_kv_qparams(tmp_path / "work", wdir, num_tp=2, echo=lambda s: None)
    r0 = np.fromfile(wdir / "layers.0.past_kv_scale.0.weight", "<f4")
    r1 = np.fromfile(wdir / "layers.0.past_kv_scale.1.weight", "<f4")
    assert r1[0] > r0[0] + 100 / 255 * 0.9
    np.testing.assert_array_equal(np.concatenate([r0, r1]), expected(st, 2, "int8", "tensor", False)[0].reshape(-1))


def test_update_config_and_printed_edits(tmp_path, capsys):
    wdir = make_workspace(tmp_path)
    make_stats(tmp_path / "work")
    res = kv_qparams.write_kv_qparams(tmp_path / "work", wdir.parent.parent, granularity="head")  # workspace root
    out = capsys.readouterr().out
    assert "quant_policy = 4    (now 0)" in out and "kv_cache_dtype = int8" in out and "kv_granularity = head" in out
    assert "model.layers.2" in out and "k_scale" in out  # the table
    assert not res.config_updated and config_unchanged(wdir)
    kv_qparams.write_kv_qparams(tmp_path / "work", wdir, granularity="head", update_config=True, echo=lambda s: None)
    cfg = load_config(wdir)
    assert (cfg.quant_policy, cfg.kv_cache_dtype, cfg.kv_granularity) == (4, "int8", "head")
    kv_qparams.write_kv_qparams(tmp_path / "work", wdir, kv_dtype="fp8_e5m2", update_config=True, echo=lambda s: None)
    cfg = load_config(wdir)
    assert (cfg.quant_policy, cfg.kv_cache_dtype, cfg.kv_granularity) == (0, "fp8_e5m2", "tensor")


def test_cli_upstream_spellings(tmp_path, capsys):
    wdir = make_workspace(tmp_path, tp=2)
    st = make_stats(tmp_path / "work")
    rc = kv_qparams.main(
        ["--work_dir", str(tmp_path / "work"), "--turbomind_dir", str(wdir), "--kv_sym", "True", "--num_tp", "2"]
    )
    assert rc == 0
    got = np.fromfile(wdir / "layers.1.past_kv_scale.1.weight", "<f4")
    np.testing.assert_array_equal(got, expected(st, 2, "int8", "tensor", True)[1, 1].reshape(-1))
    rc = kv_qparams.main(
        [
            "--work-dir",
            str(tmp_path / "work"),
            "--turbomind-dir",
            str(wdir),
            "--kv-sym",
            "False",
            "--num-tp",
            "2",
            "--kv-dtype",
            "fp8",
            "--granularity",
            "head",
            "--update-config",
        ]
    )
    assert rc == 0 and load_config(wdir).kv_cache_dtype == "fp8_e4m3"


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _nan_stats(work):
    raw = torch.load(work / "value_stats.pth", weights_only=True)
    raw["absmax"]["model.layers.1"][0, 0] = float("inf")
    torch.save(raw, work / "value_stats.pth")


def _zero_layer(work):
    raw = torch.load(work / "value_stats.pth", weights_only=True)
    for k in raw:
        raw[k]["model.layers.1"].zero_()
    torch.save(raw, work / "value_stats.pth")


def _zero_head(work):
    raw = torch.load(work / "key_stats.pth", weights_only=True)
    for k in raw:
        raw[k]["model.layers.2"][3] = 0.0
    torch.save(raw, work / "key_stats.pth")


BAD = [
    ("num_tp", dict(num_tp=2), None, r"--num-tp 2 differs from tensor_para_size = 1 .*pass --num-tp 1"),
    ("kv_bits", dict(kv_bits=4), None, r"--kv-bits 4 is not supported"),
    ("dtype", dict(kv_dtype="int4"), None, r"--kv-dtype 'int4': expected one of int8, fp8_e4m3, fp8_e5m2"),
    ("sym_fp8", dict(kv_dtype="fp8_e4m3", kv_sym=True), None, r"--kv-sym applies to int8 only"),
    ("layers", {}, dict(num_layer=2), r"stats have 2 layers but .*config.ini has num_layer = 3; .*lite.calibrate"),
    ("heads", {}, dict(heads=2), r"stats have 2 kv heads but .*kv_head_num = 4"),
    ("head_dim", {}, dict(dim=4), r"stats have 4 head_dim but .*size_per_head = 8"),
    (
        "nonfinite",
        {},
        _nan_stats,
        r"value_stats.pth: \['absmax'\]\['model.layers.1'\] has non-finite values; "
        r"re-run python -m lite.calibrate",
    ),
    (
        "zero_head",
        dict(granularity="head"),
        _zero_head,
        r"K of model.layers.2 head 3: max 0, min 0, absmax 0 gives "
        r"scale 0 .*re-run python -m lite.calibrate",
    ),
    ("zero_sym", dict(granularity="head", kv_sym=True), _zero_head, r"K of model.layers.2 head 3"),
    ("zero_fp8", dict(granularity="head", kv_dtype="fp8_e4m3"), _zero_head, r"K of model.layers.2 head 3"),
    ("zero_tensor", {}, _zero_layer, r"V of model.layers.1 rank 0 \(kv heads 0-3\): .*scale 0 "),
    ("missing", {}, "missing", r"key_stats.pth is missing; re-run python -m lite.calibrate"),
]


@pytest.mark.parametrize("name, kwargs, stats_change, match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_write_nothing(tmp_path, name, kwargs, stats_change, match):
    wdir = make_workspace(tmp_path)
    work = tmp_path / "work"
    if isinstance(stats_change, dict):
        make_stats(work, **stats_change)
    elif stats_change == "missing":
        work.mkdir()
    else:
        make_stats(work)
        if stats_change is not None:
            stats_change(work)
    before = snapshot(tmp_path / "ws")
    with pytest.raises(ValueError, match=match):
        kv_qparams.write_kv_qparams(work, wdir, echo=lambda s: None, update_config=True, **kwargs)
    assert snapshot(tmp_path / "ws") == before


def test_failed_run_keeps_previous_params(tmp_path, capsys):
    wdir = make_workspace(tmp_path)
    work = tmp_path / "work"
    make_stats(work)
    kv_qparams.write_kv_qparams(work, wdir, granularity="head", update_config=True, echo=lambda s: None)
    before = snapshot(tmp_path / "ws")
    _zero_head(work)
    rc = kv_qparams.main(
        ["--work-dir", str(work), "--turbomind-dir", str(wdir), "--granularity", "head", "--update-config"]
    )
    assert rc == 2 and "K of model.layers.2 head 3" in capsys.readouterr().err
    assert snapshot(tmp_path / "ws") == before
    # no workspace at all
    rc = kv_qparams.main(["--work-dir", str(work), "--turbomind-dir", str(tmp_path / "nowhere")])
    assert rc == 2 and "no config.ini under" in capsys.readouterr().err


def test_quiet_leaves_out_the_table(tmp_path, capsys):
    wdir = make_workspace(tmp_path)
    make_stats(tmp_path / "work")
    assert kv_qparams.main(["--work-dir", str(tmp_path / "work"), "--turbomind-dir", str(wdir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "k_scale" not in out and "model.layers.2" not in out
    assert "wrote 3 files" in out and "quant_policy = 4" in out  # the summary and the edits are still there


def test_ctrl_c_between_files_and_config(tmp_path, capsys, monkeypatch):
    """Ctrl-C while config.ini is being saved: the parameter files are complete (renamed together), config.ini
    is not updated, and the message and exit code say so."""
    import os
    import signal

    wdir = make_workspace(tmp_path)
    make_stats(tmp_path / "work")
    argv = ["--work-dir", str(tmp_path / "work"), "--turbomind-dir", str(wdir), "-q"]

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT should have raised KeyboardInterrupt")

    monkeypatch.setattr(kv_qparams, "save_config", interrupted_save)
    assert kv_qparams.main(argv + ["--update-config"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: wrote 3 parameter files"), err
    assert "config.ini was not updated" in err[0]
    assert (wdir / "layers.2.past_kv_scale.0.weight").is_file() and config_unchanged(wdir)

    def interrupted_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT should have raised KeyboardInterrupt")

    monkeypatch.setattr(kv_qparams.kv_params, "write", interrupted_write)
    assert kv_qparams.main(argv + ["--granularity", "head"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: no parameter files were written; the workspace is as it was"]
