"""Workspaces that used to run silently wrong are refused at load: num_layer against the layer files (both
ways) and inf/NaN in weight files, through the library and through runtime.chat (exit 2, one line)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from rt_workspace import make_workspace

from runtime.chat import main as chat
from runtime.workspace import WorkspaceError, load_config, read_joined, replace, save_config, weights_dir


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
