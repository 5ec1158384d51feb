"""Package metadata for kvq: KV-cache quantization (INT8 / FP8) for LLaMA-family models."""

from setuptools import find_packages, setup

setup(
    name="kvq",
    version="0.1.0",
    description="TurboMind-style deploy, KV calibration and an INT8/FP8 KV-cache runtime for LLaMA models",
    python_requires=">=3.11",
    packages=find_packages(include=["deploy", "deploy.*", "lite", "lite.*", "runtime", "runtime.*"]),
    package_data={"runtime": ["cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]},
    include_package_data=True,
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
    ],
    extras_require={
        "gpu": ["cupy-cuda12x"],
        "dev": [
            "pytest",
            "ruff",
            "gguf",
            "accelerate",
            "sentencepiece",
            # NVRTC + CUDA headers compile the kernels without a GPU (tests/cuda).
            "cupy-cuda12x",
            "nvidia-cuda-nvrtc-cu12",
            "nvidia-cuda-runtime-cu12",
            "nvidia-cuda-nvcc-cu12",
        ],
    },
)
