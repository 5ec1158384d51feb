"""`python -m deploy MODEL_NAME MODEL_PATH [--dst-path ./workspace] [--tp N] [--model-format hf] ...`

Thin CLI over deploy.convert.deploy. MODEL_NAME is the chat-template name recorded in config.ini
(e.g. smollm2, llama2, internlm-chat-7b). Errors print one line to stderr and exit with status 2;
Ctrl-C prints one "interrupted: ..." line saying whether the workspace was written (exit 130 if not,
0 if the interrupt came after the workspace was complete). Upstream's underscore spellings
(--dst_path, --tokenizer_path, --model_format) work too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy", description="Convert an HF LLaMA-family checkpoint into a TurboMind-style workspace."
    )
    parser.add_argument(
        "model_name", metavar="MODEL_NAME", help="chat template name recorded in config.ini, e.g. smollm2, llama2, base"
    )
    parser.add_argument("model_path", metavar="MODEL_PATH", help="HF checkpoint directory")
    parser.add_argument(
        "--dst-path",
        "--dst_path",
        dest="dst_path",
        default="./workspace",
        help="workspace directory to create (default: ./workspace)",
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to split the weights for (default: 1)")
    parser.add_argument(
        "--model-format",
        "--model_format",
        dest="model_format",
        default="hf",
        choices=["hf"],
        help="input format: only hf, an HF checkpoint directory (default: hf)",
    )
    parser.add_argument(
        "--tokenizer-path",
        "--tokenizer_path",
        dest="tokenizer_path",
        default=None,
        help="directory holding the tokenizer files (default: MODEL_PATH)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing workspace at --dst-path, only once the new one is complete (default: refuse)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from deploy.checkpoint import DeployError
    from deploy.convert import deploy
    from runtime import interrupts
    from runtime.workspace import WorkspaceError

    interrupts.reset()
    dst = Path(args.dst_path).absolute()
    try:
        dst = deploy(
            args.model_name,
            args.model_path,
            args.dst_path,
            args.tp,
            tokenizer_path=args.tokenizer_path,
            force=args.force,
            notes=_note,
        )
    except (DeployError, WorkspaceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if str(dst) in interrupts.written():  # the interrupt landed after the workspace was renamed into place
            print(dst)
            return interrupts.interrupted(f"after the workspace was complete: {dst} is written in full", True)
        return interrupts.interrupted(
            f"no workspace was written: {dst} is as it was (a partial copy, if one was started, was removed)"
        )
    print(dst)
    return 0


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
