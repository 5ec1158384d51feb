"""deploy killed or interrupted: stale staging directories are recognised and cleaned, and Ctrl-C says what was
written with an exit code that matches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import deploy.__main__ as cli
import deploy.convert as convert
from deploy.tree import STAGING_MARKER
from runtime.workspace import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tiny_hf):
    return tiny_hf("llama")


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def dot_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_kill_9_mid_deploy_leaves_staging_that_the_next_deploy_removes(tmp_path, llama):
    """A deploy killed with SIGKILL while writing weights cannot clean up; the next deploy to the same
    destination removes its staging directory (the marker's pid is gone) and says so."""
    killer = (
        "import os, signal, sys, deploy.convert as c\n"
        "def write(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.write_weights = write\n"
        "from deploy.__main__ import main\n"
        f"sys.exit(main(['base', {str(llama)!r}, '--dst-path', {str(tmp_path / 'ws')!r}]))\n"
    )
    res = subprocess.run([sys.executable, "-c", killer], env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr
    (stale,) = [tmp_path / n for n in dot_dirs(tmp_path)]
    assert stale.name.startswith(".ws.deploy-") and (stale / STAGING_MARKER).is_file()
    res = subprocess.run(
        [sys.executable, "-m", "deploy", "base", str(llama), "--dst-path", str(tmp_path / "ws")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert f"note: removed {stale}" in res.stderr and "killed" in res.stderr, res.stderr
    assert dot_dirs(tmp_path) == [] and load_config(tmp_path / "ws").num_layer == 2


def test_only_own_dead_staging_dirs_are_removed(tmp_path, llama):
    def fake(name: str, marker: dict | None) -> Path:
        d = tmp_path / name
        (d / "triton_models").mkdir(parents=True)
        (d / "triton_models" / "big.weight").write_bytes(b"\0" * 4096)
        if marker is not None:
            (d / STAGING_MARKER).write_text(json.dumps(marker))
        return d

    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = fake(".ws.deploy-dead", {"pid": dead_pid(), "host": host})
        alive = fake(".ws.deploy-alive", {"pid": sleeper.pid, "host": host})
        remote = fake(".ws.deploy-remote", {"pid": dead_pid(), "host": host + "-elsewhere"})
        unmarked = fake(".ws.deploy-old", None)
        moved = fake(".ws.old-abc", None)
        other = fake(".other.deploy-dead", {"pid": dead_pid(), "host": host})  # another destination's
        notes: list[str] = []
        convert.deploy("base", llama, tmp_path / "ws", 1, progress=False, notes=notes.append)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not dead.exists()
    assert all(d.is_dir() for d in (alive, remote, unmarked, moved, other))
    text = "\n".join(notes)
    assert f"removed {dead}" in text
    assert f"{alive} (4.0 KiB" not in text and f"{alive}" in text and f"pid {sleeper.pid}" in text
    assert f"{remote}" in text and "elsewhere" in text
    assert f"{unmarked}" in text and "no .kvq-deploy-staging marker" in text and "left alone" in text
    assert f"{moved}" in text and "moved aside" in text
    assert f"{other}" not in text
    assert not (tmp_path / "ws" / STAGING_MARKER).exists(), "the marker must not end up in the workspace"


def sigint_after(monkeypatch, name: str) -> None:
    """Make convert.<name> deliver a real SIGINT to this process once it has run."""
    original = getattr(convert, name)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(convert, name, wrapped)


def test_ctrl_c_while_writing_weights_exit_130_nothing_written(tmp_path, llama, monkeypatch, capsys):
    sigint_after(monkeypatch, "write_weights")
    assert cli.main(["base", str(llama), "--dst-path", str(tmp_path / "ws")]) == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("deploy:")]
    assert len(err) == 1 and err[0].startswith("interrupted: no workspace was written"), err  # no traceback
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_as_deploy_finishes_exit_0_workspace_complete(tmp_path, llama, monkeypatch, capsys):
    """The interrupt lands while the finished workspace is renamed into place: it is held until the rename is
    done, and the command reports a complete workspace with exit code 0."""
    sigint_after(monkeypatch, "install")
    dst = tmp_path / "ws"
    assert cli.main(["base", str(llama), "--dst_path", str(dst)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(dst.absolute())
    err = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("deploy:")]  # progress bar left out
    assert len(err) == 1 and err[0].startswith("interrupted: after the workspace was complete") and str(dst) in err[0]
    assert load_config(dst).num_layer == 2 and dot_dirs(tmp_path) == []


def test_upstream_underscore_spellings(tmp_path, llama):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((llama / "tokenizer.json").read_bytes())
    args = cli.build_parser().parse_args(
        ["base", str(llama), "--dst_path", "D", "--tokenizer_path", str(tok), "--model_format", "hf"]
    )
    assert (args.dst_path, args.tokenizer_path, args.model_format) == ("D", str(tok), "hf")
