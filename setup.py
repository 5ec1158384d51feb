"""Package metadata for kvq: KV-cache quantization (INT8 / FP8) for LLaMA-family models."""

from pathlib import Path

from setuptools import find_packages, setup


def workspace_template_files() -> list[tuple[str, list[str]]]:
    """workspace_template/ installed as <prefix>/share/kvq/workspace_template (deploy/tree.py looks there
    when the package is not run from a source checkout)."""
    root = Path(__file__).resolve().parent
    groups: dict[str, list[str]] = {}
    for path in sorted((root / "workspace_template").rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts:
            groups.setdefault(str(Path("share/kvq") / rel.parent), []).append(str(rel))
    return sorted(groups.items())


setup(
    name="kvq",
    version="0.1.0",
    description="TurboMind-style deploy, KV calibration and an INT8/FP8 KV-cache runtime for LLaMA models",
    python_requires=">=3.11",
    packages=find_packages(include=["deploy", "deploy.*", "lite", "lite.*", "runtime", "runtime.*"]),
    package_data={"runtime": ["cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]},
    include_package_data=True,
    data_files=workspace_template_files(),
    install_requires=[
        # torch is pinned by tools/setup.sh (2.13.0 CPU build on our machines); any 2.x with
        # float8 dtypes works, so the range stays open for users with a CUDA build.
        "torch>=2.3",
        "numpy",
        "safetensors",
        "transformers>=4.45",
        "click",
        "tqdm",
        "matplotlib",
        # python -m runtime.serve (the OpenAI-compatible HTTP server)
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "gpu": ["cupy-cuda12x", "nvidia-cuda-runtime-cu12"],  # runtime wheel: cuda_fp16.h / cuda_fp8.h for NVRTC
        "dev": [
            "pytest",
            "hypothesis",  # tests/test_scheduler.py: block accounting under random operation sequences
            "ruff",
            "gguf",
            "accelerate",
            "sentencepiece",
            # the server tests talk to it with the official client and raw HTTP
            "openai>=1.40",
            "httpx>=0.27",
            # tests/test_export.py validates the exported config with compressed-tensors' own QuantizationConfig;
            # runtime/compressed_tensors.py names this release as the config's `version`.
            "compressed-tensors>=0.20,<0.21",
            # NVRTC + CUDA headers compile the kernels without a GPU (tests/cuda).
            "cupy-cuda12x",
            "nvidia-cuda-nvrtc-cu12",
            "nvidia-cuda-runtime-cu12",
            "nvidia-cuda-nvcc-cu12",
        ],
    },
)
