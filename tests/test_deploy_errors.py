"""Bad inputs to `deploy`: each gets one clear message, and nothing is written or replaced.

Library calls check the DeployError text; a few CLI runs check the one-line stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploy.checkpoint import DeployError
from deploy.convert import deploy
from runtime.workspace import load_config

ROOT = Path(__file__).resolve().parents[1]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def clone(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        c = json.loads((dst / "config.json").read_text())
        for key, value in config_changes.items():
            if value is None:
                c.pop(key, None)
            else:
                c[key] = value
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def rewrite_tensors(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def expect_error(tmp_path: Path, hf: Path, *fragments: str, name: str = "base", tp: int = 1, **kw) -> str:
    """deploy must raise DeployError mentioning every fragment, and leave no workspace or staging dir."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(DeployError) as err:
        deploy(name, hf, out / "ws", tp, progress=False, **kw)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert "\n" not in msg
    assert list(out.iterdir()) == [], "something was written"
    return msg


@pytest.fixture(scope="module")
def llama(tiny_hf):
    return tiny_hf("llama")


def test_missing_path(tmp_path):
    expect_error(tmp_path, tmp_path / "nope", "nope", "does not exist")


def test_no_weights(tmp_path, llama):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(llama / "config.json", hf / "config.json")
    expect_error(tmp_path, hf, "no weights found", "*.safetensors", "*.bin")


def test_no_config(tmp_path):
    (tmp_path / "hf").mkdir()
    expect_error(tmp_path, tmp_path / "hf", "no config.json")


def test_unsupported_architecture(tmp_path, llama):
    hf = clone(llama, tmp_path / "hf", architectures=["GPT2LMHeadModel"])
    expect_error(tmp_path, hf, "GPT2LMHeadModel", "not supported", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_missing_tensor(tmp_path, llama):
    hf = clone(llama, tmp_path / "hf")
    rewrite_tensors(hf, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(tmp_path, hf, "missing tensor model.layers.1.mlp.up_proj.weight")


def test_wrong_shape(tmp_path, llama):
    hf = clone(llama, tmp_path / "hf")

    def shrink(state):
        state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:16].clone()

    rewrite_tensors(hf, shrink)
    expect_error(tmp_path, hf, "model.layers.0.self_attn.k_proj.weight", "(16, 64)", "expected (32, 64)")


def test_tp_not_dividing(tmp_path, llama):  # 4 heads, 2 kv heads, inter 96
    expect_error(
        tmp_path, llama, "--tp 3", "num_attention_heads 4", "num_key_value_heads 2", "intermediate_size 96", tp=3
    )
    expect_error(tmp_path, llama, "--tp 0", tp=0)


def test_unknown_model_name(tmp_path, llama):
    expect_error(tmp_path, llama, "'gpt-9'", "known:", "llama2", "internlm-chat-7b", "smollm2", name="gpt-9")


def test_head_dim_mismatch(tmp_path, llama):
    hf = clone(llama, tmp_path / "hf", head_dim=32)  # 4 heads x 32 = 128 != hidden 64
    expect_error(tmp_path, hf, "num_attention_heads 4 x head_dim 32 = 128 != hidden_size 64")


@pytest.mark.parametrize("rope_type", ["llama3", "yarn", "linear"])
def test_unsupported_rope_scaling(tmp_path, llama, rope_type):
    hf = clone(llama, tmp_path / "hf", rope_parameters={"rope_type": rope_type, "factor": 8.0, "rope_theta": 1e4})
    expect_error(tmp_path, hf, f"rope scaling type '{rope_type}'", "not supported")


def test_no_tokenizer(tmp_path, llama):
    hf = tmp_path / "hf"
    shutil.copytree(llama, hf, ignore=shutil.ignore_patterns("tokenizer*", "*.jinja"))
    expect_error(tmp_path, hf, "no tokenizer in", "--tokenizer-path")
    ws = deploy("base", hf, tmp_path / "ok", 1, tokenizer_path=llama, progress=False)
    assert (ws / "triton_models" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp16_overflow_fails_midway_and_leaves_nothing(tmp_path, llama, dtype):
    hf = clone(llama, tmp_path / "hf")

    def widen(state):
        for k in state:
            state[k] = state[k].to(dtype)
        state["model.layers.1.mlp.down_proj.weight"][3, 5] = -1.5e6

    rewrite_tensors(hf, widen)
    biggest = torch.tensor(1.5e6).to(dtype).item()  # what the source really holds after its own rounding
    dtype_name = str(dtype).removeprefix("torch.")
    expect_error(
        tmp_path, hf, f"model.layers.1.mlp.down_proj.weight ({dtype_name})", f"max |value| {biggest:.6g} > 65504"
    )


def test_widened_source_converts_exactly(tmp_path, llama):
    """fp32 sources holding fp16 values come back bit-exact (the cast is the only change)."""
    hf = clone(llama, tmp_path / "hf")
    rewrite_tensors(hf, lambda s: s.update({k: v.float() for k, v in s.items()}))
    ws_a = deploy("base", hf, tmp_path / "a", 2, progress=False)
    ws_b = deploy("base", llama, tmp_path / "b", 2, progress=False)
    assert snapshot(ws_a / "triton_models" / "weights") == snapshot(ws_b / "triton_models" / "weights")


def test_non_empty_destination_untouched(tmp_path, llama):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    before = snapshot(dst)
    with pytest.raises(DeployError, match="is not empty; pass --force"):
        deploy("base", llama, dst, 1, progress=False)
    with pytest.raises(DeployError, match="does not look like a workspace"):
        deploy("base", llama, dst, 1, force=True, progress=False)
    assert snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeployError, match="not a directory"):
        deploy("base", llama, tmp_path / "file", 1, progress=False)


def test_force_replaces_workspace_only_when_complete(tmp_path, tiny_hf, llama):
    dst = deploy("base", llama, tmp_path / "ws", 1, progress=False)
    before = snapshot(dst)
    bad = clone(llama, tmp_path / "bad")
    rewrite_tensors(bad, lambda s: s.update({"model.norm.weight": torch.full((64,), 1e6)}))
    with pytest.raises(DeployError, match="model.norm.weight"):
        deploy("base", bad, dst, 2, force=True, progress=False)
    assert snapshot(dst) == before, "a failed --force run must keep the old workspace"
    deploy("qwen-7b", tiny_hf("qwen2"), dst, 2, force=True, progress=False)
    assert load_config(dst).tensor_para_size == 2 and load_config(dst).attn_bias == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging/backup directory left behind"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert deploy("base", llama, empty, 1, progress=False) == empty.absolute()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "deploy", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_errors_are_one_line_exit_2(tmp_path, llama):
    for args, fragment in (
        ((("base", str(tmp_path / "missing")), "does not exist")),
        (("nope", str(llama)), "known:"),
        (("base", str(llama), "--tp", "3"), "intermediate_size 96"),
    ):
        res = run_cli(*args, cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "workspace").exists()


def test_cli_success_default_dst(tmp_path, llama):
    res = run_cli("smollm2", str(llama), "--tp", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str((tmp_path / "workspace").absolute())
    cfg = load_config(tmp_path / "workspace")
    assert (cfg.model_name, cfg.tensor_para_size) == ("smollm2", 2)
    res = run_cli("smollm2", str(llama), cwd=tmp_path)  # second run: destination not empty
    assert res.returncode == 2 and "--force" in res.stderr


# ----------------------------------------------------------------------------------------------
# Configs without `architectures`, corrupt weight files, config values as written


@pytest.mark.parametrize(("arch", "model_type"), [("llama", "llama"), ("mistral", "mistral"), ("qwen2", "qwen2")])
def test_no_architectures_falls_back_to_model_type(tmp_path, tiny_hf, arch, model_type):
    """transformers writes no `architectures` for a config saved with to_dict() after a GGUF load; deploy reads
    model_type as the Auto classes do, and the workspace is the one the named architecture gives."""
    src = tiny_hf(arch)
    assert json.loads((src / "config.json").read_text())["model_type"] == model_type
    name = "qwen-7b" if arch == "qwen2" else "base"
    want = deploy(name, src, tmp_path / "with", 1, progress=False)
    notes: list[str] = []
    for missing in (None, []):  # key absent, or present and empty
        hf = clone(src, tmp_path / f"hf{missing}", architectures=missing)
        got = deploy(name, hf, tmp_path / f"without{missing}", 1, progress=False, notes=notes.append)
        assert snapshot(got / "triton_models" / "weights") == snapshot(want / "triton_models" / "weights")
    assert any("no architectures" in n and repr(model_type) in n for n in notes), notes


def test_no_architectures_and_unknown_model_type(tmp_path, llama):
    hf = clone(llama, tmp_path / "hf", architectures=None, model_type="gpt2")
    expect_error(tmp_path, hf, "config.json", "no architectures", "model_type = 'gpt2'", "LlamaForCausalLM", "qwen2")
    hf = clone(llama, tmp_path / "hf2", architectures=None, model_type=None)
    expect_error(tmp_path, hf, "model_type = None", "neither names a supported model")


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_corrupt_safetensors_one_line_error(tmp_path, llama, damage):
    hf = clone(llama, tmp_path / "hf")
    f = hf / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage header": b"\x10\0\0\0\0\0\0\0{not json at all}" + data[24:]}.get(
            damage, b""
        )
    )
    expect_error(tmp_path, hf, str(f), "not a readable safetensors file", "truncated or corrupt", "re-download")
    res = run_cli("base", str(hf), "--dst-path", str(tmp_path / "cli"), cwd=tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and str(f) in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "cli").exists()


def test_norm_eps_written_as_the_checkpoint_gives_it(tmp_path, llama):
    """A GGUF-derived config holds rms_norm_eps 1e-05 widened from float32 (9.999999747378752e-06); config.ini
    says 1e-05, which fp32 computation sees as the same number. A double-precision value is kept as it is."""
    for eps, want in ((9.999999747378752e-06, "1e-05"), (1e-6, "1e-06"), (1.234567891e-6, "1.234567891e-06")):
        hf = clone(llama, tmp_path / f"hf{eps}", rms_norm_eps=eps)
        ws = deploy("base", hf, tmp_path / f"ws{eps}", 1, progress=False)
        ini = (ws / "triton_models" / "weights" / "config.ini").read_text()
        assert f"norm_eps = {want}\n" in ini, ini
        assert torch.tensor(float(want), dtype=torch.float32) == torch.tensor(eps, dtype=torch.float32)
