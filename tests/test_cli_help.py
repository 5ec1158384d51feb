"""Every command's options are documented (a help text that gives the default), and the project cites only
documents it ships."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mains():
    import deploy.__main__
    import lite.calibrate
    import lite.eval
    import lite.kv_qparams
    import lite.memory
    import runtime.chat

    return {
        "deploy": deploy.__main__.main,
        "lite.calibrate": lite.calibrate.main,
        "lite.kv_qparams": lite.kv_qparams.main,
        "lite.eval": lite.eval.main,
        "lite.memory": lite.memory.main,
        "runtime.chat": runtime.chat.main,
    }


@pytest.mark.parametrize("command", list(_mains()))
def test_every_option_has_help_with_its_default(command, monkeypatch):
    seen = {}

    def capture(self, args=None, namespace=None):  # the parser each main builds, taken before it parses
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        _mains()[command]([])
    undocumented = []
    for action in seen["parser"]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            undocumented.append(f"{name}: no help")
        elif action.option_strings and not action.required and "default" not in action.help:
            undocumented.append(f"{name}: help does not give the default")
    assert not undocumented, f"python -m {command}: {undocumented}"


def test_no_citations_of_documents_outside_the_project():
    """Users have the repository, not the documents its authors worked from: cite docs/formats.md instead."""
    outside = ["REFERENCE" + ".md", "DESIGN" + ".md", "STYLE" + ".md"]
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = [
        f"{name}: {doc}"
        for name in files
        if (ROOT / name).is_file() and (ROOT / name).suffix in (".py", ".md", ".sh", ".toml", ".cu", ".h", ".txt", "")
        for doc in outside
        if doc in (ROOT / name).read_text(errors="replace")
    ]
    assert not hits
    assert (ROOT / "docs" / "formats.md").is_file()
