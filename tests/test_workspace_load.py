"""Workspaces that used to run silently wrong are refused at load: num_layer against the layer files (both
ways) and inf/NaN in weight files, through the library and through runtime.chat (exit 2, one line). And the
load's memory: about one copy of the weights above what the process held before."""

from __future__ import annotations

import ctypes
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rt_workspace import make_workspace

from runtime.chat import main as chat
from runtime.workspace import WorkspaceError, load_config, read_joined, replace, save_config, weights_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_workspace(tiny_hf, tmp_path_factory):
    return make_workspace(tiny_hf("llama"), tmp_path_factory.mktemp("load") / "ws", session_len=64)  # 2 layers


@pytest.fixture
def ws(tiny_workspace, tmp_path):
    return shutil.copytree(tiny_workspace, tmp_path / "ws", symlinks=True)


def set_layers(ws, n: int) -> None:
    wdir = weights_dir(ws)
    save_config(replace(load_config(wdir), num_layer=n), wdir)


def run_chat(ws) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = chat(
        [str(ws), "--max-new-tokens", "4", "--temperature", "0"], stdin=io.StringIO("Hi\n\n"), stdout=out, stderr=err
    )
    return rc, out.getvalue(), err.getvalue()


def test_num_layer_smaller_than_the_files(ws):
    set_layers(ws, 1)  # layers.1.* would be ignored: a truncated model
    with pytest.raises(WorkspaceError, match=r"num_layer = 1, but .* holds weight files for 2 layers .*layers\.1\.\*"):
        read_joined(weights_dir(ws), load_config(ws))
    rc, out, err = run_chat(ws)
    assert rc == 2 and err.startswith("error: ") and "set num_layer = 2" in err and len(err.splitlines()) == 1


def test_num_layer_larger_than_the_files(ws):
    set_layers(ws, 3)
    with pytest.raises(WorkspaceError, match=r"num_layer = 3, but .* has no weight files for 1 of those layers"):
        read_joined(weights_dir(ws), load_config(ws))


def test_kv_parameter_files_do_not_count_as_layers(ws):
    from rt_workspace import write_params

    wdir = weights_dir(ws)
    set_layers(ws, 3)
    write_params(wdir, "int8", 0.1, 0.0, 0.1, 0.0)  # layers.{0,1,2}.past_kv_scale.0.weight
    set_layers(ws, 2)
    assert (wdir / "layers.2.past_kv_scale.0.weight").is_file()
    assert len(read_joined(wdir, load_config(wdir))) > 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_refused(ws, value):
    wdir = weights_dir(ws)
    name = "layers.1.feed_forward.w2.0.weight"
    w = np.fromfile(wdir / name, dtype="<f2")
    w[37] = value
    w.tofile(wdir / name)
    with pytest.raises(WorkspaceError, match=rf"{name} holds 1 non-finite values .*flat index 37.*re-run python -m"):
        read_joined(wdir, load_config(wdir))
    rc, out, err = run_chat(ws)  # used to answer with empty text and exit 0
    assert rc == 2 and name in err and "Traceback" not in err


LOAD_PEAK = """
import json, sys
import torch
from runtime.model import Transformer
from runtime.workspace import load_config, read_joined, weights_dir

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

wdir = weights_dir(sys.argv[1])
cfg = load_config(wdir)
weights = read_joined(wdir, cfg)  # maps every file and checks it (one pass over all the bytes)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
before = kib("VmRSS")
model = Transformer(cfg, weights, dtype=getattr(torch, sys.argv[2]))
print(json.dumps(dict(before=before * 1024, peak=kib("VmHWM") * 1024, nbytes=model.nbytes())))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_holds_about_one_copy_of_the_weights(tiny_hf, tmp_path, dtype):
    """The weights' load peaks at about the model's own bytes above the process's memory before it: each matrix
    is built and moved into the arena in turn, and the pages of the mapped files are let go once read (the earlier
    load held the files' pages, every transposed matrix and the arena at once: 1.7x (fp32) and 2.0x (bf16) here,
    now 1.25x: the embedding's and the largest matrix's copies as stored)."""
    hf = tiny_hf("llama", hidden_size=256, intermediate_size=2048, num_hidden_layers=4)
    ws = make_workspace(hf, tmp_path / "ws", session_len=64)
    out = subprocess.run(
        [sys.executable, "-c", LOAD_PEAK, str(ws), dtype], capture_output=True, text=True, check=True, cwd=ROOT
    )
    r = json.loads(out.stdout)
    grew = r["peak"] - r["before"]
    assert r["nbytes"] > 50 << 20  # the model is large enough for the allocator's slack not to matter
    assert grew < 1.45 * r["nbytes"], (grew / r["nbytes"], r)


def test_release_pages_keeps_the_data(tmp_path):
    """Unmapping a read-only map's pages loses nothing (the next read maps the file again); a writable or
    copy-on-write map is left alone (dropping its pages would drop the changes made through it)."""
    from runtime.workspace import release_pages

    path = tmp_path / "w.bin"
    x = np.arange(4096, dtype="<f2")
    x.tofile(path)
    ro = np.memmap(path, dtype="<f2", mode="r", shape=(64, 64))
    assert ro[63, 63] == x[-1]  # every page read once
    release_pages(ro[:8])  # through a view, as the model releases its slices
    np.testing.assert_array_equal(np.asarray(ro).reshape(-1), x)
    cow = np.memmap(path, dtype="<f2", mode="c", shape=(64, 64))
    cow[0, 0] = 7.0
    release_pages(cow)
    assert cow[0, 0] == 7.0
    release_pages(np.zeros(3))  # not a map: nothing to do


ENGINE_HEAP = """
import ctypes, json, sys
from runtime.engine import Engine

def kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

engine = Engine(sys.argv[1], kv_cache_dtype="int8_per_token_head", kv_cache_gib=0.01)
after_load = kib()
ctypes.CDLL(None).malloc_trim(0)
print(json.dumps(dict(after_load=after_load * 1024, trimmed=kib() * 1024, nbytes=engine.model.nbytes())))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="needs glibc's malloc_trim")
def test_engine_load_returns_its_freed_heap(tiny_hf, tmp_path):
    """The load's temporary copies, once freed, are handed back before the engine sizes its pool: trimming the C
    heap after Engine(...) finds little left to return (without release_heap it returned ~30 MB, half the
    weights' bytes here, and ~30 MB on the demo model)."""
    hf = tiny_hf("llama", hidden_size=256, intermediate_size=2048, num_hidden_layers=4)
    ws = make_workspace(hf, tmp_path / "ws", session_len=64)
    out = subprocess.run(
        [sys.executable, "-c", ENGINE_HEAP, str(ws)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    r = json.loads(out.stdout)
    assert r["nbytes"] > 50 << 20
    assert r["after_load"] - r["trimmed"] < 0.03 * r["nbytes"], r
