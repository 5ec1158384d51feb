"""The bf16 decode-step linear kernel (runtime.cpu_linear) against an fp32 matmul of the same bf16 inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime import cpu_linear

needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="needs an x86-64 CPU with AVX512-BF16 and g++")


@needs_kernel
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize(("N", "K"), [(960, 576), (7, 33), (1, 64), (130, 1536), (5, 31)])
def test_kernel_equals_fp32_matmul_rounded_once(B, N, K):
    """Every output is the fp32 dot product rounded to bf16: within one bf16 rounding of the exact value
    (sums of K products in another order differ from torch's by fp32 rounding only)."""
    g = torch.Generator().manual_seed(B * 1000 + N + K)
    x = torch.randn(B, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    exact = x.double() @ w.double().T
    got = cpu_linear.linear_bf16(x, w).double()
    # one bf16 rounding: |err| <= 2^-8 |exact|, plus fp32 summation error (K * 2^-24 * sum |x w|)
    bound = 2.0**-8 * exact.abs() + K * 2.0**-23 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((got - exact).abs() <= bound).all()
    assert torch.isfinite(got).all()


@needs_kernel
def test_leading_dims_zeros_and_dispatch():
    """(B, T, K) inputs keep their leading dims; zero rows give zeros; linear() takes the kernel for a few bf16
    rows and F.linear for fp32 or many rows, with the same values either way."""
    w = torch.randn(48, 64).to(torch.bfloat16)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    x[1, 2] = 0
    y = cpu_linear.linear(x, w)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert torch.equal(y[1, 2], torch.zeros(48, dtype=torch.bfloat16))
    ref = F.linear(x.float(), w.float())
    torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=1e-2)
    big = torch.randn(cpu_linear.MAX_ROWS + 1, 64).to(torch.bfloat16)
    torch.testing.assert_close(
        cpu_linear.linear(big, w).float(), F.linear(big.float(), w.float()), rtol=2**-7, atol=1e-2
    )
    x32 = torch.randn(3, 64)
    assert torch.equal(cpu_linear.linear(x32, w.float()), F.linear(x32, w.float()))


def test_bad_arguments_name_the_problem():
    if not cpu_linear.available():
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            cpu_linear.linear_bf16(torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))
        return
    with pytest.raises(ValueError, match="CPU bf16"):
        cpu_linear.linear_bf16(torch.zeros(1, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"\(N, K=8\)"):
        cpu_linear.linear_bf16(torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(4, 9, dtype=torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 576), (3, 7, 64), (5, 33), (2, 1536)])
def test_rms_norm_kernel_equals_the_formula_rounded_once(shape):
    """x * rsqrt(mean(x^2) + eps) * w in fp64 from the same bf16 inputs: the kernel is within one bf16 rounding
    (plus fp32 error), keeps the shape, and agrees with F.rms_norm; fp32 inputs take F.rms_norm itself."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16)
    w = torch.randn(shape[-1], generator=g).to(torch.bfloat16)
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    got = cpu_linear.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6 * exact.abs().amax()).all()
    torch.testing.assert_close(got.float(), F.rms_norm(x, w.shape, w, 1e-5).float(), rtol=2**-7, atol=1e-3)
    x32 = torch.randn(4, 64)
    w32 = torch.randn(64)
    assert torch.equal(cpu_linear.rms_norm(x32, w32, 1e-6), F.rms_norm(x32, (64,), w32, 1e-6))
