#!/usr/bin/env bash
# Serve this workspace with the Triton Inference Server + TurboMind backend in Docker (upstream
# LMDeploy layout). `python -m deploy` rewrites the TP line to the workspace's tensor_para_size.
# This project's own runtime does not need it: python -m runtime.chat WORKSPACE.
set -euo pipefail
TP=1
DEVICES="0"
for ((i = 1; i < TP; i++)); do DEVICES="${DEVICES},$i"; done
DEVICES="\"device=${DEVICES}\""
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${IMAGE:-openmmlab/lmdeploy:latest}"

docker run \
    --gpus "${DEVICES}" \
    --rm \
    -v "${SCRIPT_DIR}:/workspace/models" \
    --shm-size 16g \
    -p 33336:22 \
    -p 33337-33400:33337-33400 \
    --cap-add=SYS_PTRACE \
    --cap-add=SYS_ADMIN \
    --security-opt seccomp=unconfined \
    --name lmdeploy \
    -it --env NCCL_LAUNCH_MODE=GROUP "${IMAGE}" \
    tritonserver \
    --model-repository=/workspace/models/model_repository \
    --allow-http=0 \
    --allow-grpc=1 \
    --grpc-port=33337 \
    --log-verbose=0 \
    --allow-metrics=1
