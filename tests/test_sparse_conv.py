"""The direct sparse convolution (leanprop.ops.sparse_conv): forward, input gradient and weight gradient (from the
kept entries of X) equal the dense kernels up to summation order (fp32: max error <= 1e-5 of the output's scale) for
every stride, padding, kernel size, layout and batch (lane tails included); SWAT layers on it train like dense; the
calibration's budget and workspace rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanprop import models
from leanprop.nn.convert import convert_
from leanprop.ops import sparse_conv as sc
from leanprop.swat import sparse_kernels as sk
from leanprop.swat.config import SWATConfig
from leanprop.swat.functions import swat_conv2d
from tests.conftest import torch_threads

pytestmark = pytest.mark.skipif(sc.load_sparse_conv() is None, reason="no C compiler for the direct kernel")

CASES = [  # (batch, C, Co, H, W, kernel, stride, padding)
    (5, 3, 4, 7, 7, (3, 3), 1, (1, 1)),
    (16, 8, 16, 9, 8, (3, 3), 2, (1, 1)),
    (20, 16, 8, 8, 8, (1, 1), 2, (0, 0)),
    (17, 8, 8, 6, 9, (3, 3), 1, (0, 2)),
    (3, 4, 6, 11, 10, (5, 5), 2, (2, 1)),
    (33, 16, 32, 8, 8, (3, 1), 1, (1, 0)),
    (64, 32, 16, 4, 4, (3, 3), 1, (1, 1)),
    (70, 8, 24, 5, 6, (3, 3), 3, (2, 2)),
    (2, 3, 4, 40, 40, (3, 3), 9, (1, 1)),  # 81 stride phases
]


def _sparse_weight(co, ci, k, density, gen):
    w = torch.randn(co, ci, *k, generator=gen)
    return w * (torch.rand(w.shape, generator=gen) < density)


def _close(got, ref):
    assert got.shape == ref.shape
    scale = float(ref.abs().max()) or 1.0
    assert float((got - ref).abs().max()) <= 1e-5 * scale * max(1, ref[0].numel() ** 0.5 / 16)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.0, 1.0])
def test_forward_and_gradients_equal_dense(case, channels_last, density, one_thread_module):
    n, c, co, h, w, k, s, p = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.randn(n, c, h, w, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = _sparse_weight(co, c, k, density, gen)
    b = torch.randn(co, generator=gen)
    y = sc.conv_forward(x, ws, b, (s, s), p)
    ref = F.conv2d(x, ws, b, s, p)
    _close(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn(ref.shape, generator=gen).contiguous(memory_format=torch.channels_last if channels_last
                                                          else torch.contiguous_format)
    dx = sc.conv_grad_input(g, ws, x.shape, (s, s), p)
    dref = torch.ops.aten.convolution_backward(g, x, ws, None, [s, s], list(p), [1, 1], False, [0, 0], 1,
                                               [True, False, False])[0]
    _close(dx, dref)
    thr = 0.8  # dW from X_s = X where |X| >= thr, read from the dense X; and from X_s itself (threshold 0)
    x_s = torch.where(x.abs() >= thr, x, torch.zeros(()))
    dwref = torch.ops.aten.convolution_backward(g, x_s, ws, None, [s, s], list(p), [1, 1], False, [0, 0], 1,
                                                [False, True, False])[1]
    _close(sc.conv_grad_weight(x, g, ws.shape, (s, s), p, threshold=thr), dwref)
    _close(sc.conv_grad_weight(x_s, g, ws.shape, (s, s), p), dwref)


POINTWISE_CASES = [  # (batch, C, Co, H, W, stride): pixel counts with full, partial and several 128-pixel chunks
    (3, 17, 33, 7, 7, 1),
    (2, 16, 40, 9, 11, 2),
    (5, 8, 24, 16, 16, 1),
    (1, 5, 3, 1, 1, 1),
    (4, 12, 20, 13, 12, 3),
    (8, 64, 96, 12, 12, 2),
]


@pytest.mark.parametrize("case", POINTWISE_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.0, 1.0])
def test_pointwise_kernel_equals_dense(case, channels_last, density, one_thread_module):
    """The 1x1 kernel in the NCHW layout: forward (bias included) and input gradient, every stride; a channels-last
    tensor is copied in and out and keeps its layout."""
    n, c, co, h, w, s = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=fmt)
    ws, b = _sparse_weight(co, c, (1, 1), density, gen), torch.randn(co, generator=gen)
    ref = F.conv2d(x, ws, b, s)
    y = sc.pointwise_forward(x, ws, b, (s, s))
    _close(y, ref)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn(ref.shape, generator=gen).contiguous(memory_format=fmt)
    dref = torch.ops.aten.convolution_backward(g, x, ws, None, [s, s], [0, 0], [1, 1], False, [0, 0], 1,
                                               [True, False, False])[0]
    dx = sc.pointwise_grad_input(g, ws, x.shape, (s, s))
    _close(dx, dref)
    assert dx.is_contiguous(memory_format=fmt) and float(dref.abs().max()) > 0 or density == 0.0
    # through the dispatch SWAT's layers call
    _close(sk.conv_forward(x, ws, b, (s, s), (0, 0), (1, 1), "pointwise"), ref)
    _close(sk.conv_grad_input(g, ws, x.shape, (s, s), (0, 0), (1, 1), "pointwise"), dref)


def _within_one_bf16_rounding(got, ref32):
    """``got`` (bf16) is the fp32 result ``ref32`` rounded once: at most half a bf16 step (2^-8 relative) away, plus
    fp32 summation-order noise that may move a value across a rounding boundary."""
    assert got.dtype == torch.bfloat16 and got.shape == ref32.shape
    scale = float(ref32.abs().max()) or 1.0
    err = (got.float() - ref32).abs()
    assert bool((err <= 2.0 ** -8 * ref32.abs() + 1e-5 * scale * max(1, ref32[0].numel() ** 0.5 / 16)).all())


@pytest.mark.parametrize("case", CASES[:4] + [c + (None,) for c in POINTWISE_CASES[:3]])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_tensors_give_the_fp32_result_rounded_once(case, channels_last, one_thread_module):
    """bf16 in, bf16 out, fp32 inside: every op equals the fp32 dense op on the same (widened) values, rounded to
    bf16 once; the pointwise kernel's cases (7 fields) on the pointwise path, the others on the direct one."""
    pointwise = len(case) == 7
    n, c, co, h, w, *rest = case[:6] if pointwise else case
    k, s, p = ((1, 1), case[5], (0, 0)) if pointwise else tuple(rest)
    gen = torch.Generator().manual_seed(hash(case) % 1000 + 7)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=gen).bfloat16().contiguous(memory_format=fmt)
    ws = _sparse_weight(co, c, k, 0.1, gen).bfloat16()
    b = torch.randn(co, generator=gen)
    fwd, dxf = (sc.pointwise_forward, sc.pointwise_grad_input) if pointwise else (sc.conv_forward, sc.conv_grad_input)
    y = fwd(x, ws, b, (s, s), p)
    ref = F.conv2d(x.float(), ws.float(), b, s, p)
    _within_one_bf16_rounding(y, ref)
    g = torch.randn(ref.shape, generator=gen).bfloat16().contiguous(memory_format=fmt)
    dref = torch.ops.aten.convolution_backward(g.float(), x.float(), ws.float(), None, [s, s], list(p), [1, 1], False,
                                               [0, 0], 1, [True, False, False])[0]
    _within_one_bf16_rounding(dxf(g, ws, x.shape, (s, s), p), dref)
    thr = 0.8
    x_s = torch.where(x.float().abs() >= thr, x.float(), torch.zeros(()))
    dwref = torch.ops.aten.convolution_backward(g.float(), x_s, ws.float(), None, [s, s], list(p), [1, 1], False,
                                                [0, 0], 1, [False, True, False])[1]
    _within_one_bf16_rounding(sc.conv_grad_weight(x, g, ws.shape, (s, s), p, threshold=thr), dwref)


def test_bf16_linear_on_the_compiled_kernels(one_thread_module):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 9, 40, generator=gen).bfloat16()
    ws = _sparse_weight(24, 40, (), 0.1, gen).bfloat16()
    b = torch.randn(24, generator=gen)
    _within_one_bf16_rounding(sc.linear_forward(x, ws, b), F.linear(x.float(), ws.float(), b))
    g = torch.randn(6, 9, 24, generator=gen).bfloat16()
    _within_one_bf16_rounding(sc.linear_grad_input(g, ws, x.shape), g.float() @ ws.float())
    dw = sc.linear_grad_weight(x, g, ws.shape)
    _within_one_bf16_rounding(dw, g.float().reshape(-1, 24).t() @ x.float().reshape(-1, 40))


ROWS_CASES = [  # (batch, C, Co, H, W, kernel, padding): stride 1, square and not, padding 0 to k - 1
    (3, 5, 7, 9, 11, (3, 3), (1, 1)),
    (2, 4, 6, 7, 7, (5, 3), (2, 0)),
    (4, 8, 3, 6, 5, (3, 3), (0, 0)),
    (1, 3, 4, 4, 4, (2, 2), (1, 1)),
    (2, 16, 24, 15, 13, (3, 3), (2, 2)),
    (5, 8, 8, 20, 20, (7, 7), (3, 3)),
]


@pytest.mark.parametrize("case", ROWS_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.0, 1.0])
def test_rows_kernel_equals_dense(case, channels_last, density, one_thread_module):
    """The k×k kernel over the padded rows (NCHW, width innermost): forward (bias included) and input gradient; a
    channels-last tensor is copied in and out and keeps its layout; the scratch columns never reach the result."""
    n, c, co, h, w, k, p = case
    gen = torch.Generator().manual_seed(hash(case) % 1000 + 11)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=fmt)
    ws, b = _sparse_weight(co, c, k, density, gen), torch.randn(co, generator=gen)
    ref = F.conv2d(x, ws, b, 1, p)
    y = sc.rows_forward(x, ws, b, (1, 1), p)
    _close(y, ref)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn(ref.shape, generator=gen).contiguous(memory_format=fmt)
    dref = torch.ops.aten.convolution_backward(g, x, ws, None, [1, 1], list(p), [1, 1], False, [0, 0], 1,
                                               [True, False, False])[0]
    dx = sc.rows_grad_input(g, ws, x.shape, (1, 1), p)
    _close(dx, dref)
    assert dx.is_contiguous(memory_format=fmt)
    _close(sk.conv_forward(x, ws, b, (1, 1), p, (1, 1), "rows"), ref)
    _close(sk.conv_grad_input(g, ws, x.shape, (1, 1), p, (1, 1), "rows"), dref)


def test_rows_kernel_says_what_it_does_not_take():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3)
    assert sc.rows_unsupported(x, w, (1, 1), (1, 1), (1, 1)) is None
    assert "1x1" in sc.rows_unsupported(x, w[:, :, :1, :1], (1, 1), (0, 0), (1, 1))
    assert "strided" in sc.rows_unsupported(x, w, (2, 2), (1, 1), (1, 1))
    assert "padding" in sc.rows_unsupported(x, w, (1, 1), (3, 3), (1, 1))
    assert "fp32 only" in sc.rows_unsupported(x.bfloat16(), w.bfloat16(), (1, 1), (1, 1), (1, 1))
    assert "NCHW" in sc.rows_unsupported(x.contiguous(memory_format=torch.channels_last), w, (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="rows sparse kernel does not take"):
        sc.rows_forward(x, w, None, (2, 2), (1, 1))
    with pytest.raises(ValueError, match="no weight gradient"):
        sk.conv_grad_weight(x, torch.randn(2, 3, 6, 6), w.shape, (1, 1), (1, 1), (1, 1), "rows")


def test_swat_conv_on_the_rows_kernel_equals_the_dense_kernels(one_thread_module):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, 12, 12, generator=gen, requires_grad=True)
    w = torch.randn(12, 8, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(12, generator=gen, requires_grad=True)
    ws = (w * (w.abs() > 1.0)).detach()
    outs = []
    for ops in (sk.NO_SPARSE, ("rows", "rows", "direct")):
        y = swat_conv2d(x, w, ws, b, 0.5, 1, 1, sparse_ops=ops)
        outs.append((y.detach(), *torch.autograd.grad((y * y).sum(), (x, w, b))))
    for a, r in zip(outs[1], outs[0], strict=True):
        _close(a, r)

def test_pointwise_kernel_is_offered_where_it_applies():
    """Forward and grad-input of an unpadded 1x1 conv on an NCHW input; never dW, 3x3, padded or channels-last."""
    x, g = torch.randn(2, 8, 6, 6), torch.randn(2, 4, 6, 6)
    w = torch.randn(4, 8, 1, 1)
    pairs = sk.conv_op_pairs(x, w, x, g, (1, 1), (0, 0), (1, 1))
    assert "pointwise" in pairs["forward"][1] and "pointwise" in pairs["grad_input"][1]
    assert "pointwise" not in pairs["grad_weight"][1] and "direct" in pairs["grad_weight"][1]
    assert sc.pointwise_unsupported(x, torch.randn(4, 8, 3, 3), (1, 1), (1, 1), (1, 1)) == "not a 1x1 conv"
    assert sc.pointwise_unsupported(x, w, (1, 1), (1, 1), (1, 1)) == "a padded 1x1 conv"
    assert "NCHW" in sc.pointwise_unsupported(x.contiguous(memory_format=torch.channels_last), w, (1, 1), (0, 0),
                                              (1, 1))
    pairs = sk.conv_op_pairs(x.contiguous(memory_format=torch.channels_last), w, x, g, (1, 1), (0, 0), (1, 1))
    assert "pointwise" not in pairs["forward"][1]
    with pytest.raises(ValueError, match="no weight gradient"):
        sk.conv_grad_weight(x, g, w.shape, (1, 1), (0, 0), (1, 1), "pointwise")
    with pytest.raises(ValueError, match="pointwise sparse kernel does not take"):
        sc.pointwise_forward(x, torch.randn(4, 8, 3, 3), None, (1, 1), (1, 1))
    # the rows kernel: a k×k stride-1 conv's forward and grad-input on an NCHW fp32 input, never its dW
    w3 = torch.randn(4, 8, 3, 3)
    pairs = sk.conv_op_pairs(x, w3, x, g, (1, 1), (1, 1), (1, 1))
    assert "rows" in pairs["forward"][1] and "rows" in pairs["grad_input"][1] and "rows" not in pairs["grad_weight"][1]
    assert "rows" not in sk.conv_op_pairs(x, w, x, g, (1, 1), (0, 0), (1, 1))["forward"][1]  # 1x1: pointwise's
    assert "rows" not in sk.conv_op_pairs(x, w3, x, g[..., ::2, ::2], (2, 2), (1, 1), (1, 1))["forward"][1]
    assert "rows" not in sk.conv_op_pairs(x.contiguous(memory_format=torch.channels_last), w3, x, g, (1, 1), (1, 1),
                                          (1, 1))["forward"][1]


def test_swat_conv_on_the_pointwise_kernel_equals_the_dense_kernels(one_thread_module):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, 9, 9, generator=gen, requires_grad=True)
    w = torch.randn(24, 16, 1, 1, generator=gen, requires_grad=True)
    ws = (w * (w.abs() > 1.2)).detach()
    outs = []
    for ops in (sk.NO_SPARSE, ("pointwise", "pointwise", "direct")):
        y = swat_conv2d(x, w, ws, None, 0.5, 2, 0, sparse_ops=ops)
        outs.append((y.detach(), *torch.autograd.grad((y * y).sum(), (x, w))))
    for a, r in zip(outs[1], outs[0], strict=True):
        _close(a, r)


@pytest.mark.parametrize("shape", [(8, 40), (3, 5, 33), (1, 7)])
@pytest.mark.parametrize("density", [0.1, 0.0, 1.0])
def test_linear_on_the_compiled_kernels_equals_dense(shape, density, one_thread_module):
    """A linear layer: forward (bias) and grad-input by the pointwise kernel on the transposed rows, grad-weight by
    the direct kernel from the non-zeros of X_s; any leading dimensions."""
    gen = torch.Generator().manual_seed(len(shape) * 10 + int(10 * density))
    x = torch.randn(*shape, generator=gen)
    x_s = torch.where(x.abs() >= 0.7, x, torch.zeros(()))
    w = torch.randn(24, shape[-1], generator=gen)
    w = w * (torch.rand(w.shape, generator=gen) < density)
    b = torch.randn(24, generator=gen)
    g = torch.randn(*shape[:-1], 24, generator=gen)
    _close(sk.linear_forward(x, w, b, "pointwise"), F.linear(x, w, b))
    _close(sk.linear_grad_input(g, w, x.shape, "pointwise"), g @ w)
    _close(sk.linear_grad_weight(x_s, g, w.shape, "direct"), g.reshape(-1, 24).t() @ x_s.reshape(-1, shape[-1]))
    _close(sc.linear_grad_weight(x, g, w.shape, threshold=0.7), g.reshape(-1, 24).t() @ x_s.reshape(-1, shape[-1]))
    pairs = sk.linear_op_pairs(x, w, x_s, g)
    assert [list(pairs[op][1])[0] for op in sk.OPS] == ["pointwise", "pointwise", "direct"]
    assert "pointwise" not in sk.linear_op_pairs(x.double(), w.double(), x_s.double(), g.double())["forward"][1]


def test_swat_linear_on_the_compiled_kernels_trains_like_dense(one_thread_module):
    from leanprop.swat.functions import swat_linear

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, 32, generator=gen, requires_grad=True)
    w = torch.randn(16, 32, generator=gen, requires_grad=True)
    b = torch.randn(16, generator=gen, requires_grad=True)
    ws = (w * (w.abs() > 1.0)).detach()
    outs = []
    for ops in (sk.NO_SPARSE, ("pointwise", "pointwise", "direct")):
        y = swat_linear(x, w, ws, b, 0.5, sparse_ops=ops)
        outs.append((y.detach(), *torch.autograd.grad((y * y).sum(), (x, w, b))))
    for a, r in zip(outs[1], outs[0], strict=True):
        _close(a, r)


def test_two_threads_give_the_one_thread_result_up_to_order():
    gen = torch.Generator().manual_seed(1)
    x, ws = torch.randn(32, 16, 8, 8, generator=gen), _sparse_weight(32, 16, (3, 3), 0.1, gen)
    with torch_threads(1):
        y1 = sc.conv_forward(x, ws, None, (1, 1), (1, 1))
    with torch_threads(2):
        y2 = sc.conv_forward(x, ws, None, (1, 1), (1, 1))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # each output is one thread's sum in one order


def test_unsupported_convolutions_say_why():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 3, 3)
    assert sc.unsupported(x, w, (1, 1), (1, 1), (1, 1)) is None
    assert "fp32 or bf16" in sc.unsupported(x.double(), w.double(), (1, 1), (1, 1), (1, 1))
    assert "grouped" in sc.unsupported(x, w[:, :2], (1, 1), (1, 1), (1, 1), groups=2)
    assert "dilated" in sc.unsupported(x, w, (1, 1), (1, 1), (2, 2))
    assert "strides" in sc.unsupported(x, w, (1, 2), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="direct sparse kernel does not take"):
        sk.conv_forward(x.double(), w.double(), None, (1, 1), (1, 1), (1, 1), "direct")
    with pytest.raises(ValueError, match="float16"):  # called directly: a clear error, never fp16 read as fp32
        sc.conv_grad_input(x.half(), w.half(), x.shape, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="no path for a linear layer's grad-weight"):
        sk.linear_grad_weight(x.view(2, -1), torch.randn(2, 4), (4, 100), "pointwise")
    with pytest.raises(ValueError, match="no path for a linear layer's forward"):
        sk.linear_forward(x.view(2, -1), torch.randn(4, 100), None, "direct")
    with pytest.raises(ValueError, match="float16"):
        sc.conv_grad_weight(x.half(), torch.randn(2, 4, 5, 5).half(), w.shape, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="float16"):
        sc.pointwise_forward(x.half(), w[:, :, :1, :1].half(), None, (1, 1))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("compress", [False, True])
def test_swat_conv_on_the_direct_kernel_equals_the_dense_kernels(stride, compress, one_thread_module, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(18, 8, 10, 10, generator=gen, requires_grad=True)
    w = torch.randn(12, 8, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(12, generator=gen, requires_grad=True)
    ws = (w * (w.abs() > 1.0)).detach()
    outs, packed_reads = [], []
    real = sk.conv_grad_weight_packed

    def spy(*args):
        packed_reads.append(args[2])
        return real(*args)

    monkeypatch.setattr(sk, "conv_grad_weight_packed", spy)
    for ops in (sk.NO_SPARSE, ("direct", "direct", "direct")):  # dW: X and its threshold, or packed X_s
        y = swat_conv2d(x, w, ws, b, 0.5, stride, 1, compress=compress, sparse_ops=ops)
        grads = torch.autograd.grad((y * y).sum(), (x, w, b))
        outs.append((y.detach(), *grads))
    for a, r in zip(outs[1], outs[0], strict=True):
        _close(a, r)
    # packed X_s is read by the dW kernel as it is (never expanded); uncompressed, the dense X and its threshold
    assert packed_reads == ([x.shape] if compress else [])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_from_the_packed_x_s_equals_dw_from_x_and_its_threshold(case, dtype, one_thread_module):
    """The packed form (1-bit mask + kept values, ops.sparse_storage) listed from its set bits gives the same entries
    in the same order as scanning X: the same dW bit for bit, every stride phase and padding."""
    from leanprop.ops.sparse_storage import pack_above

    n, c, co, h, w, k, s, p = case
    gen = torch.Generator().manual_seed(hash(case) % 1000 + 3)
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    positions, values, meta = pack_above(x, 0.8)
    assert not meta.indexed and sc.packed_unsupported(positions, values, x.shape, meta.memory_format, False) is None
    ho, wo = (h + 2 * p[0] - k[0]) // s + 1, (w + 2 * p[1] - k[1]) // s + 1
    g = torch.randn(n, co, ho, wo, generator=gen).to(dtype)
    w_shape = (co, c, *k)
    ref = sc.conv_grad_weight(x, g, w_shape, (s, s), p, threshold=0.8)
    got = sc.conv_grad_weight_packed(positions, values, x.shape, g, w_shape, (s, s), p)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert float(ref.abs().max()) > 0
    with pytest.raises(ValueError, match="cannot cover"):
        sc.conv_grad_weight_packed(positions[:-1], values, (n, c, h, w + 8), g, w_shape, (s, s), p)


def test_packed_forms_the_dw_kernel_does_not_read_say_why():
    from leanprop.ops.sparse_storage import pack_above

    x = torch.randn(2, 3, 4, 4)
    pos, val, meta = pack_above(x.contiguous(memory_format=torch.channels_last), 0.5)
    assert "NCHW" in sc.packed_unsupported(pos, val, x.shape, meta.memory_format, meta.indexed)
    pos, val, meta = pack_above(x, 3.5)  # almost nothing kept: int32 indices are smaller
    assert meta.indexed and "indices" in sc.packed_unsupported(pos, val, x.shape, meta.memory_format, meta.indexed)
    assert "float64" in sc.packed_unsupported(pos, val.double(), x.shape, torch.contiguous_format, False)


def test_training_step_on_the_direct_kernel_equals_dense_kernels(one_thread_module):
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    grads = []
    for direct in (False, True):
        torch.manual_seed(0)
        model = models.create("resnet8", num_classes=10)
        ctl = convert_(model, SWATConfig(sparsity=0.9, topk_period=1, sparse_kernels="never"))
        if direct:
            for layer in ctl.layers.values():
                if isinstance(layer, torch.nn.Conv2d) and sk.eligible(layer) is None:
                    layer.sparse_ops = ("direct", "direct", "direct")
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_budget_stops_the_trials_and_is_counted(one_thread_module):
    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10)
    ctl = convert_(model, SWATConfig(sparsity=0.9, topk_period=1))
    x = torch.randn(16, 3, 16, 16)
    calls = []

    def timer(name, path, fn, reps):  # injected: the budget counts these milliseconds, not wall time
        calls.append(path)
        return 1.0 if path == "direct" else 2.0

    budget = sk.Budget(steps=0.0)  # nothing to spend: only the dense kernels are timed
    handles = {}
    captured = {}
    for name, layer in ctl.layers.items():
        handles[name] = layer.register_forward_pre_hook(lambda m, a, name=name: captured.__setitem__(name, a[0]))
    with torch.no_grad():
        model.eval()(x)
    for h in handles.values():
        h.remove()
    timings = sk.calibrate(ctl.layers, captured, timer=timer, budget=budget)
    assert set(calls) == {"dense"} and not any(t.sparse for t in timings)
    own = [t for t in timings if not t.note.startswith("as ")]
    assert any("budget spent" in t.note for t in own)
    assert all("budget spent" in t.note or "workspace" in t.note for t in own)
    assert budget.spent_ms == pytest.approx(sum(t.cost_ms for t in timings)) and budget.spent_ms > 0
    calls.clear()
    budget = sk.Budget()  # the default 2x: every direct trial fits (it costs half a dense run here)
    timings = sk.calibrate(ctl.layers, captured, timer=timer, budget=budget)
    assert "direct" in calls
    assert budget.spent_ms <= 2.0 * sum(t.dense_ms for t in timings)
    assert any(t.choice == "direct" for t in timings)


def test_workspace_rule_skips_im2col_of_3x3_convs_and_padded_lanes():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(16, 16, 8, 8)
    y = F.conv2d(x, conv.weight, None, 1, 1)
    sparse, dense = sk.workspace_bytes(conv, x, conv.weight, y, "csr")
    assert sparse > 2 * dense  # im2col: 9 copies of X
    sparse, dense = sk.workspace_bytes(conv, x, conv.weight, y, "direct")
    assert sparse <= 2 * dense
    sparse, dense = sk.workspace_bytes(conv, x[:2], conv.weight, y[:2], "direct")
    assert sparse > 2 * dense  # a batch of 2 fills 2 of 8 lanes
    sparse, dense = sk.workspace_bytes(conv, x[:2], conv.weight, y[:2], "direct", "grad_weight")
    assert sparse <= 2 * dense  # the dW kernel has no lanes: G channels-last, W


def test_swat_blpa_direct_kernels_read_x_in_the_form_the_storage_policy_keeps(one_thread_module):
    """Under SWAT + BLPA the policy keeps a SWAT conv's X as codes; the direct dW reads what they decode to, with the
    forward's threshold, as the dense kernels do (equal up to summation order)."""
    from leanprop.blpa.config import BLPAConfig

    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    grads, used = [], 0
    for direct in (False, True):
        torch.manual_seed(0)
        model = models.create("resnet8", num_classes=10)
        ctl = convert_(model, [SWATConfig(sparsity=0.9, topk_period=1, sparse_kernels="never"), BLPAConfig(bits=4)])
        if direct:
            for layer in ctl.swat.layers.values():
                if isinstance(layer, torch.nn.Conv2d) and sk.eligible(layer) is None:
                    layer.sparse_ops = ("direct", "direct", "direct")
                    used += 1
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert used
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
