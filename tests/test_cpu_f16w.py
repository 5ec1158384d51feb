"""The fp32 x fp16-weight linear kernel (runtime.cpu_f16w) against a float64 matmul of the same values, and the
model holding its matrices in fp16 for fp32 compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime import cpu_f16w, cpu_linear

needs_kernel = pytest.mark.skipif(not cpu_f16w.available(), reason="needs an x86-64 CPU with AVX2, FMA, F16C and g++")


@needs_kernel
# AVX2 build: 1-6 rows one pass of each width (1-3 with 6 / 2 copies of the accumulators along k), 7+ equal passes
# of up to 6; AVX-512 build: 1-12 rows one pass (1-7 with 8 / 4 / 2 copies), 13+ equal passes of up to 12; past 60:
# blocks of 60 rows (100: 60 + 40; 128 = MAX_ROWS: 60 + 60 + 8)
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 17, 18, 19, 23, 25, 64, 100, 128])
@pytest.mark.parametrize(("N", "K"), [(960, 576), (7, 33), (1, 64), (50, 1536), (97, 5), (49, 8), (5, 7001)])
def test_kernel_equals_float64_matmul_to_fp32_rounding(B, N, K, f16w_build):
    """Every output is the fp32 dot product of the activations with the exact fp32 values of the fp16 weights:
    within fp32 summation error of the float64 result, for every row count, N not a multiple of the 16-row panels
    (a last panel of 1-15 columns), K not a multiple of the copies of the accumulators along k."""
    g = torch.Generator().manual_seed(B * 1000 + N + K)
    x = torch.randn(B, K, generator=g)
    w = torch.randn(N, K, generator=g).half()
    assert_fp32_dot(cpu_f16w.linear_f16w(x, cpu_f16w.Panels.pack(w)), x, w)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize(("N", "K"), [(1, 1), (16, 3), (17, 5), (40, 64), (300, 257)])
def test_panels_hold_the_matrix_exactly(N, K, kernel, monkeypatch):
    """Panels: data[p, k, j] = W[16 p + j, k] with zero rows past N (written out here), back to the exact fp32 values
    of the matrix (through the library's unpacking, and PyTorch's where it does not run); not a
    tensor, so PyTorch refuses it instead of using shuffled weights."""
    if not kernel:
        monkeypatch.setattr(cpu_f16w, "_library", lambda: None)
    elif not cpu_f16w.available():
        pytest.skip("needs an x86-64 CPU with AVX2, FMA, F16C and g++")
    w = torch.randn(N, K).half()
    p = cpu_f16w.Panels.pack(w)
    P = -(-N // 16)
    assert p.shape == (N, K) and p.data.shape == (P, K, 16) and p.nbytes == P * K * 16 * 2
    want = torch.zeros(P * 16, K, dtype=torch.float16)
    want[:N] = w
    for n, k in [(n, k) for n in range(P * 16) for k in range(K)][:: max(1, P * 16 * K // 3000)]:
        assert p.data[n // 16, k, n % 16].item() == want[n, k].item()
    into = torch.full(p.data.shape, 7.0, dtype=torch.float16)  # packing into given memory (the model's arena)
    assert cpu_f16w.Panels.pack(w, into).data is into and torch.equal(into, p.data)
    f = p.float()
    assert f.dtype == torch.float32 and f.shape == (N, K) and torch.equal(f, w.float())
    with pytest.raises(TypeError):
        F.linear(torch.zeros(1, K), p)


def assert_fp32_dot(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got == x @ w.T to fp32 summation error: within K 2^-23 sum_k |x_k w_k| of the float64 result, whatever the
    order of the sums (a relative tolerance fails where large products cancel, as fp16's 65504 does below)."""
    K = x.shape[-1]
    exact = x.double() @ w.double().T
    bound = K * 2.0**-23 * (x.double().abs() @ w.double().abs().T) + 1e-30  # fp32 sums of K products
    assert ((got.double() - exact).abs() <= bound).all()


@needs_kernel
def test_leading_dims_special_values_and_dispatch(f16w_build):
    """(B, T, K) inputs keep their leading dims; zero rows give zeros; fp16's largest and subnormal weights are
    used at their exact values; linear() sends fp32 x fp16 here (against the float64 product, to fp32 summation
    error) and prefill-sized calls to PyTorch's GEMM on the weights cast to fp32."""
    w = torch.randn(48, 64).half()
    w[0, :3] = torch.tensor([65504.0, -65504.0, 2.0**-24])  # fp16 max and smallest subnormal: exact in fp32
    p = cpu_f16w.Panels.pack(w)
    x = torch.randn(2, 3, 64)
    x[1, 2] = 0
    y = cpu_linear.linear(x, p)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    assert torch.equal(y[1, 2], torch.zeros(48))
    assert_fp32_dot(y, x, w)
    e = torch.zeros(1, 64)
    e[0, 2] = 1.0
    assert cpu_f16w.linear_f16w(e, p)[0, 0].item() == 2.0**-24
    big = torch.randn(cpu_f16w.MAX_ROWS + 1, 64)  # prefill-sized: PyTorch's GEMM on the weights unpacked to fp32
    assert torch.equal(cpu_linear.linear(big, p), F.linear(big, w.float()))
    assert_fp32_dot(cpu_f16w.linear_f16w(big, p), big, w)
    nc = torch.randn(64, 5)[:, 1]  # a non-contiguous (K,) row: copied, same result as the contiguous one
    assert torch.equal(cpu_f16w.linear_f16w(nc, p), cpu_f16w.linear_f16w(nc.contiguous(), p))
    assert torch.equal(cpu_linear.linear(x, w), F.linear(x, w.float()))  # an unpacked fp16 matrix: PyTorch


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="Panels"):
        cpu_f16w.linear_f16w(torch.zeros(1, 8), torch.zeros(4, 8).half())  # not packed
    with pytest.raises(ValueError, match=r"\(4, 9\)"):
        cpu_f16w.linear_f16w(torch.zeros(1, 8), cpu_f16w.Panels.pack(torch.zeros(4, 9).half()))
    with pytest.raises(ValueError, match="fp16"):
        cpu_f16w.Panels.pack(torch.zeros(4, 8))  # fp32
    with pytest.raises(ValueError, match=r"out must be fp16 \(1, 8, 16\)"):
        cpu_f16w.Panels.pack(torch.zeros(4, 8).half(), torch.zeros(1, 8, 8).half())
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        cpu_f16w.Panels(torch.zeros(2, 8, 8).half(), 3)  # panels of 8 rows


@needs_kernel
def test_fp32_model_holds_fp16_matrices(tiny_hf, tmp_path):
    """With fp32 compute the workspace's fp16 matrices are kept in fp16, packed for the kernel (half the bytes; the
    fp32 norms and embedding lookups unchanged), and the logits equal those of the same model on fp32 copies of the
    matrices (PyTorch's GEMM)."""
    from rt_workspace import make_workspace

    from runtime.engine import Engine

    ws = make_workspace(tiny_hf("llama"), tmp_path / "ws")
    engine = Engine(ws, max_batch_size=1, kv_cache_dtype="fp16", dtype="float32")
    model = engine.model
    assert isinstance(model.layers[0]["wqkv"], cpu_f16w.Panels) and isinstance(model.output, cpu_f16w.Panels)
    assert model.layers[0]["attention_norm"].dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    got = engine.score(ids)
    for layer in model.layers:  # the same values in fp32: PyTorch's GEMM from here on
        for name in ("wqkv", "wo", "w13", "w2"):
            layer[name] = layer[name].float()
    model.output = model.output.float()
    torch.testing.assert_close(got, engine.score(ids), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 576), (3, 7, 64), (5, 33), (2, 1536)])
def test_rms_norm_and_add_rms_norm_fp32(shape, f16w_build):
    """fp32 rows: x * rsqrt(mean(x^2) + eps) * w within fp32 error of float64 (lengths not a multiple of 8 included);
    add_rms_norm returns x + r exactly and the norm of it, leaving x as it was."""
    g = torch.Generator().manual_seed(sum(shape))
    x, r = (torch.randn(shape, generator=g) * 3 for _ in range(2))
    w = torch.randn(shape[-1], generator=g)
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    got = cpu_linear.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= 1e-6 * exact.abs() + 1e-6 * exact.abs().amax()).all()
    x0 = x.clone()
    s, y = cpu_linear.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r) and torch.equal(x, x0)
    assert torch.equal(y, cpu_linear.rms_norm(x + r, w, 1e-5))


@needs_kernel
@pytest.mark.parametrize("B", [1, 3, 20])
def test_swiglu_linear_fp32_with_fp16_weights(B, f16w_build):
    """One call for (silu(gate) * up) @ w.T with fp32 rows and fp16 weights: the activation within ~1e-6 relative of
    PyTorch's (the kernel's own exp), gate values far into both tails included, then the fp16-weight kernel."""
    g = torch.Generator().manual_seed(B)
    h = torch.randn(B, 2 * 100, generator=g) * 3
    h[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 90.0, -90.0, 1e-3, -1e-3])
    w = torch.randn(40, 100, generator=g).half()
    gate, up = h.double().chunk(2, dim=-1)
    act = gate * torch.sigmoid(gate) * up
    exact = act @ w.double().T
    got = cpu_linear.swiglu_linear(h, cpu_f16w.Panels.pack(w))
    assert got.shape == (B, 40) and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= 4e-6 * (act.abs() @ w.double().abs().T) + 1e-30).all()


@needs_kernel
@pytest.mark.parametrize(("H", "Hkv", "D"), [(9, 3, 64), (4, 4, 128), (2, 1, 40), (1, 1, 6)])
def test_rope_qk_fp32_equals_the_complex_rotation(H, Hkv, D, f16w_build):
    """fp32 qkv rows: q and k heads rotated pairwise by rot[pos], within fp32 rounding of the float64 complex
    product (head sizes not a multiple of 8 included); a position outside the table is refused."""
    g = torch.Generator().manual_seed(H + D)
    N, S = 5, 300
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)
    pos = torch.tensor([0, 1, 299, 17, 17])
    q, k = cpu_linear.rope_qk(qkv, rot, pos, H, Hkv, D)
    assert q.shape == (N, H, D) and k.shape == (N, Hkv, D) and q.dtype == torch.float32
    x = torch.view_as_complex(qkv[:, : (H + Hkv) * D].double().view(N, H + Hkv, D // 2, 2).contiguous())
    want = torch.view_as_real(x * rot[pos].to(torch.complex128)[:, None]).flatten(-2)
    assert ((torch.cat([q, k], 1).double() - want).abs() <= 1e-6 * (want.abs() + 1)).all()
    with pytest.raises(ValueError, match="positions outside"):
        cpu_linear.rope_qk(qkv, rot, torch.tensor([0, 1, 2, 3, S]), H, Hkv, D)


@needs_kernel
def test_the_cpu_gets_its_widest_build():
    """The library the model's layers call is the AVX-512 build where the CPU has AVX-512 (a build apart from the
    AVX2 one), else the AVX2 build; asking for AVX-512 without it gives None."""
    from runtime import cpp_build

    native, avx2 = cpu_f16w._library(), cpu_f16w._library(avx512=False)
    assert avx2 is not None
    if cpp_build.cpu_has("avx512f"):
        assert native is cpu_f16w._library(avx512=True) and native is not avx2
        assert "avx512" in native._name
    else:
        assert native is avx2 and cpu_f16w._library(avx512=True) is None
