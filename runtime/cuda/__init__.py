"""CUDA kernels for the paged, quantized KV cache (CuPy RawModule), and their CPU emulation for tests.

    from runtime.cuda import kv_cache_write, decode_attention   # torch CUDA tensors; CuPy loaded on first call

kv_write.cu (cache write by slot mapping with INT8 / FP8 quantization, per head or, in the online modes, per row
with the row's fp16 (scale, zero) stored beside it; INT4 keys per channel within a block, see runtime/kv_cache.py),
decode_attention.cu (decode attention reading the fp16 / INT8 / FP8 / online INT8, FP8, INT4 pool and params
directly through block tables), kernels.py (checks + launchers),
toolchain.py (NVRTC / g++), host_ops.py + cuda_host_emulation.h + host_launch.cpp (the same kernels run on the
CPU). Nothing here imports CuPy at import time.
"""

from runtime.cuda.kernels import decode_attention, kv_cache_write

__all__ = ["decode_attention", "kv_cache_write"]
