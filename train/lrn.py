"""Local response normalisation as the AlexNet paper writes it, as two fused Triton kernels on the GPU.

    y_i = x_i / (k + alpha * sum_{j=i-n//2}^{i+(n-1)//2} x_j^2) ** beta      (sum over channels, x_j = 0 outside)

The paper does not divide alpha by n; `nn.LocalResponseNorm` does, so `PaperLRN(n, alpha, beta, k)` equals
`nn.LocalResponseNorm(n, alpha * n, beta, k)`, with the same window (n//2 channels before, (n-1)//2 after,
which also defines even n).

Why not `nn.LocalResponseNorm`: it runs as a chain of full-size kernels (square, pad, avg_pool3d, mul, add,
pow, div) and autograd keeps their intermediates, each a full read and write of the activations (what that
costs on a GPU: `benchmarks/gpu_lrn.py`, not yet run on one here). Here one Triton kernel does the forward (reads x, writes y and a saved factor u = d^(-beta-1),
where d = k + alpha * window sum) and one the backward (reads the incoming gradient, x and u, writes dx),
registered as a custom op with its own autograd formula so eager and `torch.compile` both call the same two
kernels. Without CUDA and Triton (or for float64) the same formulas run as plain tensor ops; with
TRITON_INTERPRET=1 the Triton kernels run on the CPU, which is how the tests check them.
"""

import contextlib
import math
import os

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch install has no Triton; the tensor-op path covers everything
    triton = None

_BLOCK = 1024  # elements per Triton program: 8 per thread at 4 warps, the usual size for a pointwise kernel
_WARPS = 4
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# read once, as triton.jit does when it decides whether kernels are compiled or interpreted
_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def window(size: int) -> tuple[int, int]:
    """(channels before, channels after) the centre that the window of `size` covers; nn.LocalResponseNorm's."""
    return size // 2, (size - 1) // 2


def backend(x: Tensor) -> str:
    """Which implementation PaperLRN uses for `x`: "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "torch"."""
    if triton is None or x.dtype not in _TRITON_DTYPES:
        return "torch"
    if x.is_cuda or (x.device.type == "cpu" and _INTERPRET):
        return "triton"
    return "torch"


def _saved_dtype(dtype: torch.dtype) -> torch.dtype:
    # u = d^(-beta-1) can be far below float16's range, so 16-bit inputs keep it in bfloat16 (float32's range)
    return torch.bfloat16 if dtype in (torch.float16, torch.bfloat16) else dtype


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dense(x: Tensor) -> Tensor:
    """`x` itself when it is dense NCHW-contiguous or channels_last, else a contiguous copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _channel_stride(x: Tensor) -> int:
    """Elements between neighbouring channels of a `_dense` tensor: 1 for channels_last, H*W*... otherwise."""
    return math.prod(x.shape[2:]) if x.is_contiguous() else 1


def _strided_like(t: Tensor, x: Tensor) -> Tensor:
    """`t` with exactly `x`'s strides (the kernels index g, x and u with one flat index)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def _window_sum(t: Tensor, before: int, after: int) -> Tensor:
    """sum_{j=i-before}^{i+after} t[:, j] for every channel i (zeros outside), added in order of j."""
    channels = t.shape[1]
    padded = nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (before, after))
    total = padded.narrow(1, 0, channels).clone()
    for offset in range(1, before + after + 1):
        total += padded.narrow(1, offset, channels)
    return total


def _forward_torch(x: Tensor, size: int, alpha: float, beta: float, k: float, save: bool) -> tuple[Tensor, Tensor]:
    xo = x.to(_opmath(x.dtype))
    s = _window_sum(xo * xo, *window(size))
    # nn.LocalResponseNorm's operations in its order (mean over the window times alpha * n), so that float64
    # results are bit-identical to it and the window convention is checked exactly.
    d = (s / size).mul(alpha * size).add(k)
    d_beta = d.pow(beta)
    y = torch.empty_like(x).copy_(xo / d_beta)
    u = torch.empty_like(x, dtype=_saved_dtype(x.dtype)).copy_((d_beta * d).reciprocal()) if save else x.new_empty(0)
    return y, u


def _backward_torch(g: Tensor, x: Tensor, u: Tensor, size: int, alpha: float, beta: float) -> Tensor:
    t = _opmath(x.dtype)
    go, xo, uo = g.to(t), x.to(t), u.to(t)
    before, after = window(size)
    # channel i is in the window of channels i-after .. i+before, so the transposed window swaps the two
    w = _window_sum(go * xo * uo, after, before)
    dx = go * uo.pow(beta / (beta + 1.0)) - (2.0 * alpha * beta) * xo * w  # u^(beta/(beta+1)) = d^-beta
    return torch.empty_like(x).copy_(dx)


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, y_ptr, u_ptr, n, alpha, beta, k,
                        C: tl.constexpr, Q: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr,
                        SAVE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        # Flat index i over a dense tensor whose channel neighbours lie Q elements apart (Q = 1: channels_last).
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        c = (i // Q) % C
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for o in tl.static_range(-BEFORE, AFTER + 1):  # neighbours come from L1/L2: HBM is read once
            ok = inside & (c + o >= 0) & (c + o < C)
            v = tl.load(x_ptr + i + o * Q, mask=ok, other=0.0).to(tl.float32)
            s += v * v
        x = tl.load(x_ptr + i, mask=inside, other=0.0).to(tl.float32)
        d = k + alpha * s
        r = tl.exp2(-beta * tl.log2(d))  # d^-beta
        tl.store(y_ptr + i, (x * r).to(y_ptr.dtype.element_ty), mask=inside)
        if SAVE:
            tl.store(u_ptr + i, (r / d).to(u_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _backward_kernel(g_ptr, x_ptr, u_ptr, dx_ptr, n, alpha, beta,
                         C: tl.constexpr, Q: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr,
                         WIDE: tl.constexpr, BLOCK: tl.constexpr):
        # dx_i = g_i d_i^-beta - 2 alpha beta x_i sum_{j: i in window(j)} g_j x_j d_j^(-beta-1)
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        c = (i // Q) % C
        w = tl.zeros([BLOCK], dtype=tl.float32)
        for o in tl.static_range(-AFTER, BEFORE + 1):
            ok = inside & (c + o >= 0) & (c + o < C)
            gj = tl.load(g_ptr + i + o * Q, mask=ok, other=0.0).to(tl.float32)
            xj = tl.load(x_ptr + i + o * Q, mask=ok, other=0.0).to(tl.float32)
            uj = tl.load(u_ptr + i + o * Q, mask=ok, other=0.0).to(tl.float32)
            w += gj * xj * uj
        g = tl.load(g_ptr + i, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + i, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=inside, other=1.0).to(tl.float32)
        r = tl.exp2(beta / (beta + 1.0) * tl.log2(u))  # u^(beta/(beta+1)) = d^-beta; u = 0 gives 0
        dx = g * r - 2.0 * alpha * beta * x * w
        tl.store(dx_ptr + i, dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _on_device(x: Tensor):
    """Make x's GPU the current one for a launch (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_args(x: Tensor, size: int) -> dict:
    n = x.numel()
    before, after = window(size)
    return dict(C=x.shape[1], Q=_channel_stride(x), BEFORE=before, AFTER=after,
                WIDE=n + _BLOCK >= 2**31, BLOCK=_BLOCK, num_warps=_WARPS)


def _forward_triton(x: Tensor, size: int, alpha: float, beta: float, k: float, save: bool) -> tuple[Tensor, Tensor]:
    y = torch.empty_like(x)
    u = torch.empty_like(x, dtype=_saved_dtype(x.dtype)) if save else x.new_empty(0)
    if x.numel():
        grid = (triton.cdiv(x.numel(), _BLOCK),)
        with _on_device(x):
            _forward_kernel[grid](x, y, u if save else y, x.numel(), alpha, beta, k, SAVE=save, **_launch_args(x, size))
    return y, u


def _backward_triton(g: Tensor, x: Tensor, u: Tensor, size: int, alpha: float, beta: float) -> Tensor:
    dx = torch.empty_like(x)
    if x.numel():
        grid = (triton.cdiv(x.numel(), _BLOCK),)
        with _on_device(x):
            _backward_kernel[grid](g, x, u, dx, x.numel(), alpha, beta, **_launch_args(x, size))
    return dx


@torch.library.custom_op("paper_lrn::forward", mutates_args=())
def _lrn_forward(x: Tensor, size: int, alpha: float, beta: float, k: float, save: bool) -> tuple[Tensor, Tensor]:
    """(y, u): the normalised x, and u = d^(-beta-1) for the backward (an empty tensor unless `save`)."""
    x = _dense(x)
    if backend(x) == "triton":
        return _forward_triton(x, size, alpha, beta, k, save)
    return _forward_torch(x, size, alpha, beta, k, save)


@_lrn_forward.register_fake
def _(x, size, alpha, beta, k, save):
    x = _dense(x)
    return torch.empty_like(x), torch.empty_like(x, dtype=_saved_dtype(x.dtype)) if save else x.new_empty(0)


@torch.library.custom_op("paper_lrn::backward", mutates_args=())
def _lrn_backward(g: Tensor, x: Tensor, u: Tensor, size: int, alpha: float, beta: float) -> Tensor:
    """dL/dx from dL/dy, the forward's (dense) input x and its saved u."""
    g = _strided_like(g, x)
    if backend(x) == "triton":
        return _backward_triton(g, x, u, size, alpha, beta)
    return _backward_torch(g, x, u, size, alpha, beta)


@_lrn_backward.register_fake
def _(g, x, u, size, alpha, beta):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, size, alpha, beta, _, _ = inputs
    ctx.save_for_backward(_dense(x), output[1])
    ctx.lrn = (size, alpha, beta)
    ctx.set_materialize_grads(False)  # u has no gradient; do not let autograd fill a zero tensor for it


def _backward(ctx, grad_y, grad_u):
    if grad_y is None:  # y did not reach the loss
        return None, None, None, None, None, None
    x, u = ctx.saved_tensors
    return _lrn_backward(grad_y, x, u, *ctx.lrn), None, None, None, None, None


_lrn_forward.register_autograd(_backward, setup_context=_setup_context)


class PaperLRN(nn.Module):
    """The AlexNet paper's local response normalisation over channels of an (N, C, ...) tensor.

    Paper constants by default (k=2, n=5, alpha=1e-4, beta=0.75); alpha is NOT divided by `size`.
    The output has x's dtype and memory format (channels_last stays channels_last).
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        if size < 1:
            raise ValueError(f"LRN size must be >= 1, not {size}")
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise ValueError(f"PaperLRN expects (N, C, ...) input with 3 or more dimensions, got shape {tuple(x.shape)}")
        save = torch.is_grad_enabled() and x.requires_grad  # inference skips writing u
        y, _ = _lrn_forward(x, self.size, self.alpha, self.beta, self.k, save)
        return y

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
