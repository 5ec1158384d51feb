"""`python -m deploy MODEL_NAME MODEL_PATH [--dst-path ./workspace] [--tp N] [--model-format hf] ...`

Thin CLI over deploy.convert.deploy. MODEL_NAME is the chat-template name recorded in config.ini
(e.g. smollm2, llama2, internlm-chat-7b). Errors print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy", description="Convert an HF LLaMA-family checkpoint into a TurboMind-style workspace."
    )
    parser.add_argument("model_name", metavar="MODEL_NAME", help="chat template name, e.g. smollm2, llama2, base")
    parser.add_argument("model_path", metavar="MODEL_PATH", help="HF checkpoint directory")
    parser.add_argument("--dst-path", default="./workspace", help="workspace directory to create (default ./workspace)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to split the weights for")
    parser.add_argument("--model-format", default="hf", choices=["hf"], help="input format (only hf)")
    parser.add_argument("--tokenizer-path", default=None, help="tokenizer directory (default: MODEL_PATH)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing workspace at --dst-path (after the new one is complete)",
    )
    args = parser.parse_args(argv)

    from deploy.checkpoint import DeployError
    from deploy.convert import deploy
    from runtime.workspace import WorkspaceError

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
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(dst)
    return 0


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
