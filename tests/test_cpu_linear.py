"""The bf16 decode-step linear kernel (runtime.cpu_linear) against an fp32 matmul of the same bf16 inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime import cpu_linear

needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="needs an x86-64 CPU with AVX512-BF16 and g++")


@needs_kernel
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 8, 13, 16, 17, 32, 40])
@pytest.mark.parametrize(("N", "K"), [(960, 576), (7, 33), (1, 64), (130, 1536), (5, 31), (48, 64)])
def test_kernel_equals_fp32_matmul_rounded_once(B, N, K, linear_build):
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
    big = torch.randn(cpu_linear.max_rows() + 1, 64).to(torch.bfloat16)
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
    (plus fp32 error), keeps the shape, and agrees with F.rms_norm."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16)
    w = torch.randn(shape[-1], generator=g).to(torch.bfloat16)
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    got = cpu_linear.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6 * exact.abs().amax()).all()
    torch.testing.assert_close(got.float(), F.rms_norm(x, w.shape, w, 1e-5).float(), rtol=2**-7, atol=1e-3)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's bf16 ulp (b's magnitude; 2^-133 floor for zeros)."""
    ulp = torch.ldexp(torch.ones_like(b.float()), torch.frexp(b.float().abs()).exponent - 8).clamp_min(2.0**-133)
    return (a.float() - b.float()).abs() / ulp


@needs_kernel
@pytest.mark.parametrize("B", [1, 3, 11, 24])
def test_swiglu_linear_equals_silu_times_up_then_linear(B, linear_build):
    """One call for (F.silu(gate) * up) @ w.T: the activation carries F.silu's and the product's bf16 roundings (at
    most one bf16 ulp apart from PyTorch's: the kernel's exp is not torch's), then the linear kernel; fp32 inputs
    with fp32 weights take PyTorch."""
    g = torch.Generator().manual_seed(B)
    h = (torch.randn(B, 2 * 1536, generator=g) * 3).to(torch.bfloat16)
    h[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 90.0, -90.0, 1e-3, -1e-3])
    w = torch.randn(576, 1536, generator=g).to(torch.bfloat16)
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) * up
    got = cpu_linear.swiglu_linear(h, w)
    want = cpu_linear.linear_bf16(act, w)
    ref = act.double() @ w.double().T  # exact on the PyTorch activation
    assert got.shape == (B, 576) and got.dtype == torch.bfloat16
    # the activations agree to a bf16 ulp, so the outputs agree to the sum of those differences times |w|
    bound = 2.0**-7 * (act.double().abs() @ w.double().abs().T) * 2.0**-1 + 2.0**-8 * ref.abs()
    assert ((got.double() - ref).abs() <= bound + (want.double() - ref).abs()).all()
    assert torch.equal(
        cpu_linear.swiglu_linear(h.float(), w.float()), F.linear(F.silu(gate.float()) * up.float(), w.float())
    )


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 7, 576), (3, 100)])
def test_add_rms_norm_equals_add_then_rms_norm(shape):
    """(x + r, rms_norm(x + r) * w) in one call: the sum is torch's bf16 add exactly, the norm the rms_norm
    kernel's; x is left as it was."""
    g = torch.Generator().manual_seed(sum(shape))
    x, r = (torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(shape[-1], generator=g).to(torch.bfloat16)
    x0 = x.clone()
    s, y = cpu_linear.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r) and torch.equal(x, x0)
    assert torch.equal(y, cpu_linear.rms_norm(x + r, w, 1e-5))


@needs_kernel
@pytest.mark.parametrize(("H", "Hkv", "D"), [(9, 3, 64), (4, 4, 128), (2, 1, 40)])
def test_rope_qk_equals_the_complex_rotation(H, Hkv, D):
    """The q and k heads of fused qkv rows rotated pairwise by rot[pos] in fp32, rounded once to bf16, against the
    complex product in float64 (within one bf16 rounding); v is not read into the outputs."""
    g = torch.Generator().manual_seed(H + D)
    N, S = 5, 300
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g).to(torch.bfloat16)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)
    pos = torch.tensor([0, 1, 299, 17, 17])
    q, k = cpu_linear.rope_qk(qkv, rot, pos, H, Hkv, D)
    assert q.shape == (N, H, D) and k.shape == (N, Hkv, D)
    x = torch.view_as_complex(qkv[:, : (H + Hkv) * D].double().view(N, H + Hkv, D // 2, 2).contiguous())
    want = torch.view_as_real(x * rot[pos].to(torch.complex128)[:, None]).flatten(-2)
    assert (bf16_ulps(torch.cat([q, k], 1), want) <= 0.5 + 1e-3).all()
    with pytest.raises(ValueError, match="positions outside"):
        cpu_linear.rope_qk(qkv, rot, torch.tensor([0, 1, 2, 3, S]), H, Hkv, D)
