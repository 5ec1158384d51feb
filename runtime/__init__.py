"""kvq runtime: load a workspace and serve it with an FP16 / INT8 / FP8 KV cache.

    from runtime import LLM, SamplingParams      # vLLM-shaped API (runtime/llm.py, runtime/sampling.py)

Names are resolved lazily (PEP 562) so that `import runtime.templates` or `runtime.workspace`, as
deploy and lite do, does not pay for torch, transformers or CuPy.
"""

_LAZY = {
    "LLM": "runtime.llm",
    "CompletionOutput": "runtime.llm",
    "RequestOutput": "runtime.llm",
    "SamplingParams": "runtime.sampling",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
