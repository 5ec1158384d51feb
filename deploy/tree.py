"""The workspace directory: template skeleton, tokenizer copy, staging dir and the final rename.

Tree (docs/formats.md §1), built from `workspace_template/` in a temporary directory next to the
destination and renamed into place only when complete:

    service_docker_up.sh                         TP=1 rewritten to TP={tp}
    model_repository/{turbomind,preprocessing,postprocessing} -> ../triton_models/{interactive,...}
    triton_models/interactive/config.pbtxt, interactive/1/weights -> ../../weights
    triton_models/{pre,post}processing/1/model.py, 1/tokenizer -> ../../tokenizer
    triton_models/tokenizer/                     tokenizer files copied from the HF directory
    triton_models/weights/                       config.ini + fp16 weight files (deploy/convert.py)

A user's directory is never deleted silently: a non-empty destination needs --force, --force
only replaces something that looks like a workspace, and only after the new one is complete.

The staging directory `.NAME.deploy-XXXX` holds a marker file (STAGING_MARKER: pid and host of the
deploy writing it) until the moment it is renamed into place. A deploy killed with SIGKILL cannot
clean up, and its staging directory is as large as the model; the next deploy to the same
destination removes such directories when the marker's process is gone (`clean_stale_staging`),
says so, and only mentions directories it cannot prove are its own.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import site
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deploy.checkpoint import DeployError

# The repo-relative template (source checkout / editable install), then setup.py's data_files install.
TEMPLATE_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "workspace_template",
    Path(sys.prefix) / "share" / "kvq" / "workspace_template",
    Path(site.getuserbase()) / "share" / "kvq" / "workspace_template",  # pip install --user
)
TOKENIZER_PATTERNS = ("*.json", "tokenizer.model", "*.jinja", "merges.txt", "vocab.*", "*.tiktoken")
NOT_TOKENIZER = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MODEL_REPOSITORY = {"turbomind": "interactive", "preprocessing": "preprocessing", "postprocessing": "postprocessing"}
STAGING_MARKER = ".kvq-deploy-staging"  # JSON {"pid", "host"}: this directory is a deploy's unfinished workspace


def template_dir() -> Path:
    for candidate in TEMPLATE_CANDIDATES:
        if (candidate / "service_docker_up.sh").is_file():
            return candidate
    raise DeployError(
        f"workspace_template/ not found (looked in {', '.join(map(str, TEMPLATE_CANDIDATES))}); "
        "reinstall kvq from a source checkout (pip install -e .)"
    )


def tokenizer_files(path: Path) -> list[Path]:
    """Tokenizer files of an HF directory (*.json, tokenizer.model, *.jinja, merges.txt, vocab.*)."""
    if not path.is_dir():
        raise DeployError(f"tokenizer path {path} is not a directory; pass --tokenizer-path HF_DIR")
    files = sorted(
        {f for pattern in TOKENIZER_PATTERNS for f in path.glob(pattern) if f.is_file() and f.name not in NOT_TOKENIZER}
    )
    names = {f.name for f in files}
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
        raise DeployError(
            f"no tokenizer in {path} (no tokenizer.json, tokenizer.model or vocab.json); "
            "pass --tokenizer-path DIR holding the model's tokenizer"
        )
    return files


def check_destination(dst: Path, force: bool) -> Path:
    """Refuse a destination we may not replace; return it absolute."""
    dst = dst.absolute()
    if dst.exists() and not dst.is_dir():
        raise DeployError(f"destination {dst} exists and is not a directory; choose another --dst-path")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise DeployError(
                f"destination {dst} is not empty; pass --force to replace it (after the new "
                "workspace is complete) or choose another --dst-path"
            )
        if not (dst / "triton_models").is_dir():
            raise DeployError(
                f"destination {dst} is not empty and does not look like a workspace (no "
                "triton_models/); --force only replaces workspaces: remove it yourself or "
                "choose another --dst-path"
            )
    return dst


@contextlib.contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """A temporary directory beside `dst` (same filesystem, so the final rename is atomic); removed on failure."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.deploy-", dir=dst.parent))
    (tmp / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the workspace gets the usual directory mode
    try:
        yield tmp
    finally:  # success renamed tmp away; anything still here is a failed or interrupted attempt
        if tmp.exists():
            remove_staging(tmp)


def remove_staging(tmp: Path) -> None:
    """Delete a staging directory, its marker last: if this is interrupted too, the rest is still recognisable."""
    for child in tmp.iterdir():
        if child.name == STAGING_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    shutil.rmtree(tmp)


def clean_stale_staging(dst: Path) -> list[str]:
    """Remove our staging directories beside `dst` whose deploy process is gone; one message per directory seen.

    Only a directory with our marker, written on this host by a pid that no longer runs, is removed. Others
    (a running deploy, another host, an older deploy without the marker, a workspace moved aside by an
    interrupted --force) are left alone and mentioned with their size.
    """
    messages = []
    for d in sorted(dst.parent.glob(glob.escape(f".{dst.name}") + ".deploy-*")):
        if not d.is_dir() or d.is_symlink():
            continue
        size = _gib(d)
        owner = _staging_owner(d)
        if owner is None:
            messages.append(
                f"{d} ({size}) looks like the staging directory of an interrupted deploy but has no "
                f"{STAGING_MARKER} marker; left alone: delete it if no deploy is writing it"
            )
        elif owner["host"] != socket.gethostname() or _running(owner["pid"]):
            messages.append(
                f"{d} ({size}) is being written by deploy pid {owner['pid']} on {owner['host']}; left alone"
            )
        else:
            remove_staging(d)
            messages.append(
                f"removed {d} ({size}): the staging directory of a deploy that was killed (pid {owner['pid']} "
                "no longer runs)"
            )
    for d in sorted(dst.parent.glob(glob.escape(f".{dst.name}") + ".old-*")):
        if d.is_dir() and not d.is_symlink():
            messages.append(
                f"{d} ({_gib(d)}) holds a workspace that an interrupted --force deploy had moved aside; left "
                f"alone: move it back to {dst} or delete it"
            )
    return messages


def _staging_owner(d: Path) -> dict | None:
    try:
        owner = json.loads((d / STAGING_MARKER).read_text())
        return {"pid": int(owner["pid"]), "host": str(owner["host"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _gib(d: Path) -> str:
    total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
    return f"{total / 2**30:.2f} GiB" if total >= 2**27 else f"{total / 2**20:.1f} MiB"


def install(tmp: Path, dst: Path) -> None:
    """Move the finished workspace `tmp` to `dst`, replacing an (already checked) old one last.

    The staging marker goes just before the rename that makes `tmp` the workspace (run this with Ctrl-C held).
    """
    if dst.is_dir() and not any(dst.iterdir()):
        dst.rmdir()
    if not dst.exists():
        (tmp / STAGING_MARKER).unlink()
        os.replace(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old.rmdir()  # only the unique name is wanted
    os.replace(dst, old)
    try:
        (tmp / STAGING_MARKER).unlink()
        os.replace(tmp, dst)
    except OSError:
        os.replace(old, dst)  # put the user's workspace back before reporting the failure
        raise
    shutil.rmtree(old)


def build_tree(root: Path, tp: int, tok_files: list[Path]) -> Path:
    """Lay out the workspace skeleton under `root`; returns the (empty) weights directory."""
    shutil.copytree(template_dir(), root, dirs_exist_ok=True)
    script = root / "service_docker_up.sh"
    text, count = re.subn(r"^TP=1$", f"TP={tp}", script.read_text(), flags=re.MULTILINE)
    if count != 1:
        raise DeployError(f"{template_dir() / 'service_docker_up.sh'}: expected one line 'TP=1'; restore the template")
    script.write_text(text)
    script.chmod(0o755)

    models = root / "triton_models"
    weights = models / "weights"
    weights.mkdir(parents=True)
    (models / "interactive" / "1").mkdir(parents=True, exist_ok=True)
    (models / "interactive" / "1" / "weights").symlink_to("../../weights")
    tokenizer = models / "tokenizer"
    tokenizer.mkdir()
    for f in tok_files:
        shutil.copy2(f, tokenizer / f.name)
    for stage in ("preprocessing", "postprocessing"):
        (models / stage / "1" / "tokenizer").symlink_to("../../tokenizer")
    repo = root / "model_repository"
    repo.mkdir()
    for link, target in MODEL_REPOSITORY.items():
        (repo / link).symlink_to(f"../triton_models/{target}")
    return weights
