"""PaperLRN against nn.LocalResponseNorm (with alpha * n): values, window, gradients, dtypes, layouts, compile.

The same tests also check the Triton kernels: `test_triton_kernels_interpreted` reruns this file with
TRITON_INTERPRET=1, under which float32/16-bit CPU tensors go through the Triton kernels (see train.lrn.backend).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from train import lrn as lrn_module
from train.lrn import PaperLRN, backend, window

ALPHA, BETA, K = 1e-4, 0.75, 2.0
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and lrn_module.triton is not None


def activations(shape, dtype=torch.float32, channels_last=False, seed=0, scale=30.0):
    """ReLU-like input: about half zeros, the rest large enough that alpha * sum x^2 is not negligible next to k."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).relu().to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def reference(size):
    return nn.LocalResponseNorm(size, alpha=ALPHA * size, beta=BETA, k=K)


def grads(module, x, g):
    """(output, dL/dx) of `module` at `x` for the incoming gradient `g`."""
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad


SHAPES = [(2, 96, 11, 11), (1, 256, 6, 5), (1, 7, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [3, 4, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float64_is_bit_identical_to_nn(shape, size, channels_last):
    x = activations(shape, torch.float64, channels_last)
    assert torch.equal(PaperLRN(size, ALPHA, BETA, K)(x), reference(size)(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_forward_and_backward_match_nn(shape, size, channels_last):
    x = activations(shape, torch.float32, channels_last)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    y, dx = grads(PaperLRN(size, ALPHA, BETA, K), x, g)
    y_ref, dx_ref = grads(reference(size), x.double(), g.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=0)
    # a gradient entry can cancel to about zero, so its error is measured against the gradient's scale
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-6 * dx_ref.abs().max().item())


@pytest.mark.parametrize("size", [3, 4, 5])
def test_float64_backward_matches_nn_autograd(size):
    x = activations((2, 96, 5, 4), torch.float64, channels_last=True)
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, dx = grads(PaperLRN(size, ALPHA, BETA, K), x, g)
    _, dx_ref = grads(reference(size), x, g)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_gradcheck(size):
    # strong normalisation (alpha 0.5, k 1) so the cross-channel term dominates the numerical Jacobian
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradcheck(PaperLRN(size, alpha=0.5, beta=0.75, k=1.0), (x,))


@pytest.mark.parametrize("size", [3, 4, 5])
def test_window_convention(size):
    # One large channel c among ones: exactly the channels whose window holds c shrink, i.e.
    # c - after .. c + before, where the window of channel i is i - before .. i + after.
    c, channels = 6, 12
    x = torch.ones(1, channels, 1, 1, dtype=torch.float64)
    x[0, c] = 100.0
    y = PaperLRN(size, ALPHA, BETA, K)(x)
    background = 1.0 / (K + ALPHA * size) ** BETA  # a channel whose window holds only ones (and no edge)
    before, after = window(size)
    shrunk = [i for i in range(channels) if i != c and y[0, i, 0, 0] < background * (1 - 1e-9)]
    assert shrunk == [i for i in range(c - after, c + before + 1) if i != c]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 96, 9, 9), (1, 256, 5, 6)])
def test_bfloat16_matches_float32_reference(shape, channels_last):
    x = activations(shape, torch.bfloat16, channels_last)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y, dx = grads(PaperLRN(5, ALPHA, BETA, K), x, g)
    y_ref, dx_ref = grads(reference(5), x.float(), g.float())
    assert y.dtype == dx.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(dx.float(), dx_ref, rtol=2e-2, atol=2e-2 * dx_ref.abs().max().item())


def test_float16_large_activations_keep_their_gradient():
    # d^(-beta-1) is about 1e-11 here, below float16's range; the saved factor is bfloat16, so no underflow.
    x = activations((1, 16, 4, 4), torch.float64, scale=3e4).clamp(max=6e4).to(torch.float16)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    y, dx = grads(PaperLRN(5, ALPHA, BETA, K), x, g)
    y_ref, dx_ref = grads(reference(5), x.double(), g.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=2e-2, atol=2e-2 * dx_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_format_is_kept(dtype):
    lrn = PaperLRN()
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = activations((2, 32, 5, 7), dtype).contiguous(memory_format=fmt)
        y, dx = grads(lrn, x, torch.ones_like(x))
        assert y.stride() == dx.stride() == x.stride()
        assert y.dtype == dx.dtype == dtype
    # a non-dense view (every other channel) is normalised like its dense copy
    x = activations((2, 64, 5, 7), torch.float32, channels_last=True)[:, ::2]
    assert torch.equal(lrn(x), lrn(x.contiguous()))
    # a gradient in another layout than the input is handled too
    x = activations((2, 32, 5, 7), torch.float32, channels_last=True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(grads(lrn, x, g)[1], grads(lrn, x.contiguous(), g)[1], rtol=0, atol=0)


def test_other_ranks_and_empty_batch():
    lrn = PaperLRN(5, ALPHA, BETA, K)
    x3 = activations((2, 20, 9), torch.float64)
    x5 = activations((2, 20, 3, 4, 2), torch.float64)
    assert torch.equal(lrn(x3), reference(5)(x3))
    assert torch.equal(lrn(x5), reference(5)(x5))
    empty = torch.zeros(0, 96, 4, 4, requires_grad=True)
    y = lrn(empty)
    y.sum().backward()
    assert y.shape == empty.shape == empty.grad.shape


def test_autocast_bfloat16_keeps_the_convs_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 96, 3), nn.ReLU(), PaperLRN()).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), model(x), rtol=2e-2, atol=2e-2)


def test_inference_does_not_save():
    x = activations((1, 8, 2, 2))
    y, u = torch.ops.paper_lrn.forward(x, 5, ALPHA, BETA, K, False)
    assert u.numel() == 0 and torch.equal(y, PaperLRN()(x))
    _, u = torch.ops.paper_lrn.forward(x, 5, ALPHA, BETA, K, True)
    assert u.shape == x.shape


def test_bad_arguments():
    with pytest.raises(ValueError, match="size must be >= 1"):
        PaperLRN(0)
    with pytest.raises(ValueError, match="3 or more dimensions"):
        PaperLRN()(torch.ones(4, 96))
    assert repr(PaperLRN()) == "PaperLRN(size=5, alpha=0.0001, beta=0.75, k=2.0)"


def test_backend():
    assert backend(torch.ones(1, 2, 3, dtype=torch.float64)) == "torch"
    assert backend(torch.ones(1, 2, 3)) == ("triton" if INTERPRETED else "torch")


def test_custom_ops_are_registered_for_compile():
    # fake-tensor (shape) functions, autograd registration and AOT dispatch: what torch.compile relies on
    x = activations((2, 8, 3, 3), torch.float64, channels_last=True).requires_grad_()
    torch.library.opcheck(torch.ops.paper_lrn.forward.default, (x, 5, ALPHA, BETA, K, True))
    _, u = torch.ops.paper_lrn.forward(x.detach(), 5, ALPHA, BETA, K, True)
    torch.library.opcheck(torch.ops.paper_lrn.backward.default, (torch.ones_like(x), x.detach(), u, 5, ALPHA, BETA))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(8, 96, 55, 55), (8, 256, 27, 27)])
def test_cuda_matches_nn(shape, channels_last, dtype):
    x = activations(shape, dtype, channels_last).cuda()
    g = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype).cuda()
    lrn = PaperLRN(5, ALPHA, BETA, K)
    assert backend(x) == ("triton" if lrn_module.triton is not None else "torch")
    y, dx = grads(lrn, x, g)
    y_ref, dx_ref = grads(reference(5), x.double(), g.double())
    assert y.stride() == dx.stride() == x.stride()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=tol, atol=tol * dx_ref.abs().max().item())
    with torch.no_grad():  # the inference variant (no saved factor) gives the same output
        assert torch.equal(lrn(x), y)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++ or $CXX)")
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 96, 3), nn.ReLU(), PaperLRN())
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 17, 17).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    compiled_grad = model[0].weight.grad.clone()
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_grad, model[0].weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(lrn_module.triton is None, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="already running under the Triton interpreter")
def test_triton_kernels_interpreted():
    # The fast tests of this file again, with float32 and 16-bit tensors going through the Triton kernels
    # (the interpreter runs them on the CPU). Its float32 -> bfloat16 stores truncate where a GPU rounds to
    # nearest, which the bfloat16 tolerances cover.
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    float64_only = "not float64 and not gradcheck and not window and not custom_ops"  # these never reach Triton
    args = ["-q", "-m", "not slow", "-k", float64_only, "-p", "no:cacheprovider", __file__]
    done = subprocess.run([sys.executable, "-m", "pytest", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_the_lrn_benchmark_reports_only_what_it_measured():
    """No model speed derived from throughputs measured elsewhere: each step row is the LRNs' own time."""
    from benchmarks.gpu_lrn import per_step

    rows = [dict(impl=impl, mode="eager", batch=512, shape=[512, c, hw, hw], ms=ms, least_traffic_gb_per_s=None)
            for impl, ms in (("none", 0.5), ("PaperLRN", 1.0), ("nn.LocalResponseNorm", 4.0)) for c, hw in ((96, 55), (256, 27))]
    assert per_step(rows) == [dict(impl="nn.LocalResponseNorm", mode="eager", batch=512, lrn_ms_per_step=7.0),
                              dict(impl="PaperLRN", mode="eager", batch=512, lrn_ms_per_step=1.0)]
