"""KV scales in compressed-tensors checkpoints: lite.export writes them, deploy imports them, both exactly.

The written config is parsed by the `compressed-tensors` package itself and the directory is loaded by
transformers; scale values are checked against the formula in numpy; the round trip export -> deploy must
give the parameter files lite.kv_qparams writes from the same stats, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deploy import __main__ as deploy_cli
from deploy.checkpoint import DeployError
from deploy.convert import deploy
from lite import export as export_cli
from lite import stats as stats_mod
from lite.kv_qparams import write_kv_qparams
from runtime import compressed_tensors as ct
from runtime import kv_params
from runtime.workspace import load_config, weight_table

L, H, D = 2, 2, 16  # the tiny llama: 2 layers, 2 kv heads (4 query heads), head_dim 16
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def make_stats(work_dir: Path, seed: int = 0, layers: int = L) -> dict[str, np.ndarray]:
    """Random stats saved through lite.stats; returns absmax (layers, H, D) of K and V as float32 numpy."""
    g = torch.Generator().manual_seed(seed)
    kv, amax = [], {}
    for which in ("k", "v"):
        a, b = (torch.randn(layers, H, D, generator=g) * 3 + s for s in (0.5, -0.5))
        mx, mn = torch.maximum(a, b), torch.minimum(a, b)
        kv.append(stats_mod.Stats(mx, mn, torch.maximum(mx.abs(), mn.abs())))
        amax[which] = kv[-1].absmax.numpy()
    stats_mod.save(work_dir, stats_mod.KVStats(*kv, [stats_mod.layer_name(i) for i in range(layers)]))
    return amax


def expected_scale(amax: np.ndarray, granularity: str) -> np.ndarray:
    """Hand formula: amax / 448 in float32, over a layer's heads and channels (tensor) or a head's channels."""
    reduced = amax.max(axis=(1, 2))[:, None] if granularity == "tensor" else amax.max(axis=2)  # (L, 1) | (L, H)
    return reduced.astype(np.float32) / np.float32(448.0)


def with_scales(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quant: dict | None) -> Path:
    """A copy of checkpoint `src` with extra tensors and config.json quantization_config `quant` (None: none)."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state.update(tensors)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    if quant is not None:
        config["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def ct_config(**scheme_changes) -> dict:
    """A compressed-tensors quantization_config as LLM Compressor writes it (tensor strategy unless changed)."""
    scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    scheme.update(scheme_changes)
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "kv_cache_scheme": scheme,
        "quantization_status": "frozen",
        "config_groups": {},
        "ignore": [],
        "version": "0.20.1",
    }


def per_layer(fn) -> dict[str, torch.Tensor]:
    """{name: tensor} from fn(i) -> {name: tensor} over the tiny model's layers."""
    return {k: v for i in range(L) for k, v in fn(i).items()}


def read_files(wdir: Path, kv_dtype: str, granularity: str) -> dict[str, bytes]:
    cfg = load_config(wdir)
    names = [kv_params.file_name(i, r, kv_dtype, granularity) for i in range(L) for r in range(cfg.tensor_para_size)]
    return {n: (wdir / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def llama(tiny_hf):
    return tiny_hf("llama")


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("work_dir")
    return work_dir, make_stats(work_dir)


@pytest.fixture(scope="module")
def exported(llama, stats, tmp_path_factory):
    """granularity -> checkpoint exported from the tiny llama and the random stats."""
    root = tmp_path_factory.mktemp("exported")
    return {
        g: export_cli.export(
            str(llama), str(stats[0]), str(root / g), granularity=g, progress=False, echo=lambda _: None
        ).out
        for g in ("tensor", "head")
    }


# ----------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("granularity,strategy", [("tensor", "tensor"), ("head", "attn_head")])
def test_config_is_what_compressed_tensors_validates(exported, granularity, strategy):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    qc = json.loads((exported[granularity] / "config.json").read_text())["quantization_config"]
    assert qc == ct_config(strategy=strategy)  # spelled out here, independently of the module
    parsed = QuantizationConfig.model_validate(qc)
    scheme = parsed.kv_cache_scheme
    assert (scheme.num_bits, scheme.type, scheme.strategy, scheme.dynamic, scheme.symmetric) == (
        8,
        "float",
        strategy,
        False,
        True,
    )
    assert parsed.quantization_status == QuantizationStatus.FROZEN and parsed.config_groups == {}
    assert parsed.format == "dense" and parsed.quant_method == "compressed-tensors"


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_scales_are_amax_over_448_in_float32(exported, stats, granularity):
    amax = stats[1]
    with safe_open(str(exported[granularity] / "model.safetensors"), framework="np") as f:
        for i in range(L):
            for kv in ("k", "v"):
                t = f.get_tensor(f"model.layers.{i}.self_attn.{kv}_scale")
                want = expected_scale(amax[kv], granularity)[i]
                assert t.dtype == np.float32
                assert t.shape == ((1,) if granularity == "tensor" else (H, 1, 1))
                assert np.array_equal(t.reshape(-1).view(np.uint32), want.view(np.uint32)), (i, kv)


def test_weights_and_files_unchanged_and_transformers_loads(exported, llama):
    """Every source tensor bit-identical, tokenizer/generation files copied, and transformers loads the directory.

    transformers 5.x does not turn kv_cache_scheme into modules, so it reports the scale tensors as
    unexpected keys (and only those) and the model's weights equal the source's.
    """
    from transformers import AutoModelForCausalLM

    out = exported["head"]
    src, got = load_file(llama / "model.safetensors"), load_file(out / "model.safetensors")
    scale_names = {f"model.layers.{i}.self_attn.{kv}_scale" for i in range(L) for kv in "kv"}
    assert set(got) == set(src) | scale_names
    for name, t in src.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
    for name in TOKENIZER:
        assert (out / name).read_bytes() == (llama / name).read_bytes(), name
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert set(info["unexpected_keys"]) <= scale_names
    assert not info["missing_keys"] and not info["mismatched_keys"]
    reference = AutoModelForCausalLM.from_pretrained(llama)
    ref_state = reference.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref_state[name]), name


def test_sharded_source_keeps_its_shards(llama, stats, tmp_path):
    """Scales go into the shard that holds the layer's k_proj; the index lists them; transformers loads it."""
    from transformers import AutoModelForCausalLM

    state = load_file(llama / "model.safetensors")
    src = shutil.copytree(llama, tmp_path / "sharded", ignore=shutil.ignore_patterns("*.safetensors"))
    names, weight_map = sorted(state), {}
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, src / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (src / ct.INDEX).write_text(json.dumps(index))

    out = export_cli.export(str(src), str(stats[0]), str(tmp_path / "out"), progress=False, echo=lambda _: None).out
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(weight_map.values()))
    new_index = json.loads((out / ct.INDEX).read_text())
    for i in range(L):
        for kv in "kv":
            name = f"model.layers.{i}.self_attn.{kv}_scale"
            shard = weight_map[f"model.layers.{i}.self_attn.k_proj.weight"]
            assert new_index["weight_map"][name] == shard
            with safe_open(str(out / shard), framework="pt") as f:
                assert name in f.keys()
    assert new_index["metadata"]["total_size"] == total + 4 * 2 * L
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]


@pytest.mark.parametrize(
    "kv_dtype,fragments",
    [
        ("int8", ["INT8 KV parameters cannot be exported", "symmetric float8", "--kv-dtype fp8_e4m3"]),
        ("fp8_e5m2", ["fp8_e5m2 KV parameters cannot be exported", "E4M3", "--kv-dtype fp8_e4m3"]),
    ],
)
def test_int8_and_e5m2_refused(llama, stats, tmp_path, kv_dtype, fragments):
    with pytest.raises(ct.CompressedTensorsError) as err:
        export_cli.export(str(llama), str(stats[0]), str(tmp_path / "out"), kv_dtype, progress=False)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_asymmetric_refused(llama, tmp_path):
    k = torch.full((L, H), 0.01)
    params = kv_params.KVParams("fp8_e4m3", "head", k, torch.full((L, H), 0.5), k, torch.zeros(L, H))
    with pytest.raises(ct.CompressedTensorsError, match="asymmetric .* vLLM accepts only symmetric float8"):
        ct.export_checkpoint(llama, tmp_path / "out", params, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_input_errors(llama, stats, tmp_path):
    def refused(model, work_dir, out, *fragments):
        with pytest.raises(ValueError) as err:
            export_cli.export(str(model), str(work_dir), str(out), progress=False)
        for fragment in fragments:
            assert fragment in str(err.value), (fragment, str(err.value))

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    refused(llama, stats[0], busy, "is not an empty directory")
    assert snapshot(busy) == {"x": b"keep"}

    other = tmp_path / "other_stats"
    make_stats(other, layers=3)
    refused(llama, other, tmp_path / "o1", "3 layers x 2 kv heads", "num_hidden_layers 2", "lite.calibrate")
    refused(llama, tmp_path / "nostats", tmp_path / "o2", "key_stats.pth is missing", "lite.calibrate")

    quantized = with_scales(llama, tmp_path / "q", {}, ct_config())
    refused(quantized, stats[0], tmp_path / "o3", "already has a quantization_config", "unquantized checkpoint")
    binary = shutil.copytree(llama, tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    refused(binary, stats[0], tmp_path / "o4", "no *.safetensors", "save_pretrained")
    truncated = shutil.copytree(llama, tmp_path / "trunc")  # fails while copying: the staging dir must go
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate((truncated / "model.safetensors").stat().st_size - 8)
    refused(truncated, stats[0], tmp_path / "o5", "model.safetensors: data ends at byte", "re-download it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "busy", "other_stats", "q", "trunc"]


def test_cli(llama, stats, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(llama), "--work-dir", str(stats[0]), "--out", str(out), "--no-progress"]
    assert export_cli.main([*argv, "--granularity", "head"]) == 0
    printed = capsys.readouterr().out
    assert f"vllm serve {out} --kv-cache-dtype fp8" in printed and "attn_head" in printed
    assert export_cli.main([*argv[:-3], "--out", str(tmp_path / "o2"), "--kv-dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: INT8 KV parameters cannot be exported") and err.count("\n") == 1
    help_text = " ".join(export_cli.build_parser().format_help().split())
    assert "(default fp8_e4m3 = fp8" in help_text and "tensor (default)" in help_text


# ----------------------------------------------------------------------------------------------
# Import (deploy) and the round trip


@pytest.mark.parametrize("granularity,tp", [("tensor", 1), ("head", 1), ("head", 2)])
def test_round_trip_bit_for_bit(exported, llama, stats, tmp_path, granularity, tp):
    """export -> deploy gives exactly the files kv_qparams writes from the same stats, and the same weights."""
    notes: list[str] = []
    ws = deploy("base", exported[granularity], tmp_path / "imported", tp, progress=False, notes=notes.append)
    ref = deploy("base", llama, tmp_path / "ref", tp, progress=False)
    write_kv_qparams(
        stats[0], ref, num_tp=tp, kv_dtype="fp8_e4m3", granularity=granularity, update_config=True, echo=lambda _: None
    )
    wdir, ref_wdir = ws / "triton_models" / "weights", ref / "triton_models" / "weights"
    assert snapshot(wdir) == snapshot(ref_wdir)  # weights, the scale files and config.ini, byte for byte
    cfg = load_config(wdir)
    assert (cfg.kv_cache_dtype, cfg.kv_granularity, cfg.quant_policy) == ("fp8_e4m3", granularity, 0)
    assert set(p.name for p in wdir.iterdir()) == set(weight_table(cfg)) | set(
        read_files(wdir, "fp8_e4m3", granularity)
    ) | {"config.ini"}
    assert any(f"FP8 E4M3 KV scales for {L} layers, {granularity} granularity" in n for n in notes), notes


def test_tensor_scales_at_tp2_are_per_layer(exported, stats, tmp_path):
    """compressed-tensors' `tensor` is one scale per layer: every TP rank's file gets that one value
    (kv_qparams --num-tp 2 would reduce per rank instead)."""
    ws = deploy("base", exported["tensor"], tmp_path / "ws", 2, progress=False)
    want = {kv: expected_scale(stats[1][kv], "tensor") for kv in "kv"}
    for name, raw in read_files(ws / "triton_models" / "weights", "fp8_e4m3", "tensor").items():
        i = int(name.split(".")[1])
        got = np.frombuffer(raw, "<f4")
        assert np.array_equal(got, np.array([want["k"][i, 0], 0, want["v"][i, 0], 0], np.float32)), name


def test_legacy_output_scale_import(llama, tmp_path):
    k = [torch.tensor([0.01 * (i + 1)]) for i in range(L)]
    v = [torch.tensor([0.02 * (i + 1)]) for i in range(L)]
    tensors = per_layer(
        lambda i: {
            f"model.layers.{i}.self_attn.k_proj.output_scale": k[i],
            f"model.layers.{i}.self_attn.v_proj.output_scale": v[i],
        }
    )
    hf = with_scales(llama, tmp_path / "hf", tensors, ct_config())
    notes: list[str] = []
    ws = deploy("base", hf, tmp_path / "ws", 1, progress=False, notes=notes.append)
    params = kv_params.read(ws / "triton_models" / "weights", load_config(ws), "fp8_e4m3", "tensor")
    assert torch.equal(params.k_scale, torch.cat(k)[:, None].expand(L, H))
    assert torch.equal(params.v_scale, torch.cat(v)[:, None].expand(L, H))
    assert any("legacy k_proj.output_scale" in n for n in notes), notes


def test_single_kv_scale_without_quantization_config(llama, tmp_path):
    """One kv_scale per layer, bf16, no quantization_config: read as vLLM reads it (K = V, static E4M3)."""
    kv = [torch.tensor(0.03 * (i + 1), dtype=torch.bfloat16) for i in range(L)]
    hf = with_scales(llama, tmp_path / "hf", per_layer(lambda i: {f"model.layers.{i}.self_attn.kv_scale": kv[i]}), None)
    ws = deploy("base", hf, tmp_path / "ws", 2, progress=False)
    cfg = load_config(ws)
    assert (cfg.kv_cache_dtype, cfg.kv_granularity) == ("fp8_e4m3", "tensor")
    params = kv_params.read(ws / "triton_models" / "weights", cfg, "fp8_e4m3", "tensor")
    want = torch.stack([t.float() for t in kv])[:, None].expand(L, H)
    assert torch.equal(params.k_scale, want) and torch.equal(params.v_scale, want)


def test_deploy_cli_prints_what_it_imported(exported, tmp_path, capsys):
    assert deploy_cli.main(["base", str(exported["head"]), "--dst-path", str(tmp_path / "ws")]) == 0
    err = capsys.readouterr().err
    assert "note: imported FP8 E4M3 KV scales for 2 layers, head granularity, from k_scale / v_scale" in err
    assert "kv_cache_scheme strategy attn_head" in err


def good_scales(i: int) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor([0.01]) for kv in "kv"}


@pytest.mark.parametrize(
    "tensors,quant,fragments",
    [
        (
            per_layer(good_scales),
            ct_config(dynamic=True),
            ["dynamic = true cannot be honoured", "--calculate-kv-scales"],
        ),
        (per_layer(good_scales), ct_config(num_bits=4), ["num_bits = 4 cannot be honoured", "only 8-bit"]),
        (per_layer(good_scales), ct_config(type="int"), ['type = "int" cannot be honoured']),
        (per_layer(good_scales), ct_config(symmetric=False), ["symmetric = false cannot be honoured"]),
        (per_layer(good_scales), ct_config(strategy="channel"), ['strategy = "channel"', "tensor, attn_head"]),
        ({}, ct_config(), ["declares static KV-cache scales", "model.layers.0.self_attn.k_scale"]),
        (per_layer(good_scales), {**ct_config(), "kv_cache_scheme": None}, ["kv_cache_scheme is null"]),
        (
            per_layer(good_scales),
            {**ct_config(), "config_groups": {"group_0": {"targets": ["Linear"]}}},
            ["config_groups ['group_0']", "fp16 weights only"],
        ),
        (per_layer(good_scales), {"quant_method": "fp8"}, ["quant_method 'fp8'", "compressed-tensors"]),
        (good_scales(0), ct_config(), ["model.layers.1.self_attn.k_scale is missing"]),
        (
            {**per_layer(good_scales), "model.layers.1.self_attn.kv_scale": torch.tensor([0.1])},
            ct_config(),
            ["mixes KV scale styles"],
        ),
        (
            {**per_layer(good_scales), "model.layers.0.self_attn.v_scale": torch.full((H, 1, 1), 0.1)},
            ct_config(),
            ["model.layers.0.self_attn.v_scale has shape [2, 1, 1], expected [1] for strategy tensor"],
        ),
        (
            {**per_layer(good_scales), "model.layers.1.self_attn.k_scale": torch.tensor([0.0])},
            None,
            ["model.layers.1.self_attn.k_scale = [0.0]", "finite and > 0"],
        ),
        ({**per_layer(good_scales), **good_scales(2)}, ct_config(), ["layers.2.self_attn", "beyond the model's 2"]),
    ],
    ids=[
        "dynamic",
        "4bit",
        "int",
        "asym",
        "channel",
        "no-tensors",
        "null-scheme",
        "weights-quantized",
        "other-method",
        "missing-layer",
        "mixed-styles",
        "wrong-shape",
        "zero-scale",
        "extra-layer",
    ],
)
def test_unusable_scales_refused(llama, tmp_path, tensors, quant, fragments):
    hf = with_scales(llama, tmp_path / "hf", tensors, quant)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DeployError) as err:
        deploy("base", hf, out / "ws", 1, progress=False)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert list(out.iterdir()) == [], "something was written"
