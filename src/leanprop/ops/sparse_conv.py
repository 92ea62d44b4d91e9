"""Direct convolution with an unstructured sparse weight on the CPU (``csrc/sparse_conv.c``).

The activation is laid out batch-innermost, ``(C, H, W, L)`` with ``L`` the batch rounded up to 8 lanes, so every
non-zero weight multiplies contiguous vectors (Nikdan et al., "SparseProp", ICML 2023, Sec. 3; docs/methods/swat.md,
'Sparse kernels'). The weight is put in CSR form on every call (its values change every step, its mask every
``topk_period``), and the activation is transposed in and out: all three are part of what a call costs.

* forward ``Y = conv(X, W_s) + b``: rows = output channels, one pass over each row's non-zeros per tile of output
  pixels held in registers;
* input gradient ``dX = conv_T(G, W_s)``: the same kernel on G with the transposed, flipped weight, once per
  stride phase of the output pixels (a stride-s convolution has s² phases, each a stride-1 correlation);
* weight gradient ``dW = conv_w(X_s, G)`` (dense, every weight learns): driven by the kept entries of X
  (``|x| >= threshold``), each adding ``x · G[n, oh, ow, :]`` to ``dW[:, ci, kh, kw]`` for its taps, with G
  channels-last and zero-padded so that no tap branches; the 90 % of X that SWAT drops cost nothing but the scan.

Inputs are blocked by channels so that the part of X one block reads stays in the L2 cache. Results equal the
dense convolution up to summation order. fp32 and bf16; bf16 is computed in fp32: the pointwise kernel widens each
chunk of its input as it reads it and rounds its output once, the weight gradient reads a bf16 X as it lists the
kept entries (G is widened first), and the direct forward and input gradient widen their input and round their
result around the fp32 kernel (copies the calibration's timing and workspace rule count); groups 1, dilation 1,
equal strides (:func:`unsupported`).

The pointwise kernel (:func:`pointwise_forward`, :func:`pointwise_grad_input`) is the other layout: a 1×1
convolution of an NCHW tensor is, per image, ``Y = W_s · X`` with X a (C, H·W) matrix, so every non-zero weight
multiplies a contiguous row of pixels in the tensor's own layout, with no transposition in or out. It pays where
the batch-innermost layout does not: small batches (ResNet-50's 1×1 convs at batch 8). A linear layer is the same
product on the transposed rows (:func:`linear_forward`, :func:`linear_grad_input`; its weight gradient is the direct
dW of a 1×1 conv over (rows, in, 1, 1), :func:`linear_grad_weight`).
"""

from __future__ import annotations

import ctypes
import functools
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from leanprop.ops.kernels import build_library
from leanprop.ops.packing import memory_format_of

__all__ = ["SparseConvKernels", "load_sparse_conv", "unsupported", "conv_forward", "conv_grad_input",
           "conv_grad_weight", "packed_unsupported", "conv_grad_weight_packed", "lanes", "pointwise_unsupported",
           "pointwise_forward", "pointwise_grad_input", "rows_unsupported", "rows_forward", "rows_grad_input",
           "linear_unsupported", "linear_forward", "linear_grad_input", "linear_grad_weight"]

_SOURCE = Path(__file__).with_name("csrc") / "sparse_conv.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
LANE = 8  # the batch is padded to a multiple (tiles of 64, 16 and 8 lanes; csrc)
TILE_PIXELS = 6  # output pixels per register tile at 64 lanes (csrc: P4)
PW_CHUNK = 128  # pixels per task of the pointwise kernel (csrc)
BLOCK_BYTES = 512 * 1024  # input bytes one channel block may touch per tile: about the L2 cache
TAKEN_DTYPES = (torch.float32, torch.bfloat16)  # bf16: computed in fp32, converted at the boundary
_lock = threading.Lock()
_loaded: dict[str, SparseConvKernels | Exception] = {}


def lanes(n: int) -> int:
    """The lane count of a batch of ``n``: n rounded up to a multiple of 8."""
    return (n + LANE - 1) // LANE * LANE


class SparseConvKernels:
    """ctypes bindings of ``csrc/sparse_conv.c``."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.lib, self.path = lib, path
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.nb_pack_f32.argtypes = [p, i64, i64, i64, i64, i32, i64, i64, i64, i64, i64, p, i32]
        lib.nb_unpack_f32.argtypes = [p, i64, i64, i64, i64, i64, i32, p, p, i32]
        lib.csr_forward_f32.argtypes = [p, i64, i64, i64, i64, i64, i64, i64, i64, i64, i32, p, p, p, i32]
        lib.csr_grad_input_f32.argtypes = [p, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i32,
                                           p, p, p, i32]
        lib.sparse_corr_nb_f32.argtypes = [p, i64, i64, i64, p, p, p, i64, i64, i64, i64, i64, p, i64, i64, i64,
                                           i64, i64, i64, i64, p, i32]
        lib.sparse_grad_weight_f32.argtypes = [p, ctypes.c_float, i64, i64, i64, i64, p, i64, i64, i64, i64, i64,
                                               i64, i64, i64, i64, i64, i64, p, i32]
        lib.nhwc_pad_f32.argtypes = [p, i64, i64, i64, i64, i32, i64, i64, i64, i64, i64, p, i32]
        lib.transpose_rows_f32.argtypes = [p, i64, i64, i64, p, i32]
        lib.pointwise_nchw_f32.argtypes = [p, i64, i64, i64, p, p, p, i64, p, p, i64, i32]
        lib.pointwise_nchw_bf16.argtypes = [p, i64, i64, i64, i64, p, p, p, i64, p, p, i64, i32]
        lib.sparse_grad_weight_bf16.argtypes = lib.sparse_grad_weight_f32.argtypes
        lib.plane_starts.argtypes = [p, i64, i64, p]
        lib.sparse_grad_weight_packed.argtypes = [p, i32, p, p, i64, i64, i64, i64, p, i64, i64, i64, i64, i64, i64,
                                                  i64, i64, i64, i64, i64, p, i32]

    def __deepcopy__(self, memo: dict) -> SparseConvKernels:
        return self

    def pack(self, x: Tensor, pad_top: int, pad_left: int, hp: int, wp: int) -> Tensor:
        """``(C, hp, wp, L)``: x (N, C, H, W; NCHW or channels-last) at offset (pad_top, pad_left), zeros around."""
        x = _dense_layout(x)
        n, c, h, w = x.shape
        cl = int(memory_format_of(x) is torch.channels_last)
        out = torch.empty((c, hp, wp, lanes(n)), dtype=torch.float32)
        self.lib.nb_pack_f32(x.data_ptr(), n, c, h, w, cl, pad_top, pad_left, hp, wp, out.shape[3], out.data_ptr(),
                             torch.get_num_threads())
        return out

    def unpack(self, y: Tensor, n: int, bias: Tensor | None, channels_last: bool) -> Tensor:
        """The (n, C, H, W) tensor (channels-last when asked) of a ``(C, H, W, L)`` one, plus ``bias[c]``."""
        c, h, w, lane = y.shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((n, c, h, w), dtype=torch.float32, memory_format=fmt)
        b = _bias_f32(bias)
        self.lib.nb_unpack_f32(y.data_ptr(), n, c, h, w, lane, int(channels_last), None if b is None else b.data_ptr(),
                               out.data_ptr(), torch.get_num_threads())
        return out

    def _csr(self, fill, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        rowptr = torch.zeros(rows + 1, dtype=torch.int64)
        fill(1, rowptr.data_ptr(), None, None)
        torch.cumsum(rowptr, 0, out=rowptr)
        nnz = int(rowptr[-1])
        off, val = torch.empty(nnz, dtype=torch.int64), torch.empty(nnz, dtype=torch.float32)
        fill(0, rowptr.data_ptr(), off.data_ptr(), val.data_ptr())
        return rowptr, off, val

    def csr_forward(self, w: Tensor, hp: int, wp: int, lane: int) -> tuple[Tensor, Tensor, Tensor]:
        co, ci, kh, kw = w.shape
        nt = torch.get_num_threads()
        return self._csr(lambda count, rp, off, val: self.lib.csr_forward_f32(
            w.data_ptr(), co, ci, kh, kw, 1, 1, hp, wp, lane, count, rp, off, val, nt), co)

    def csr_grad_input(self, w: Tensor, s: int, r: int, rw: int, jt: int, jl: int, gh: int, gw: int, lane: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
        co, ci, kh, kw = w.shape
        nt = torch.get_num_threads()
        return self._csr(lambda count, rp, off, val: self.lib.csr_grad_input_f32(
            w.data_ptr(), co, ci, kh, kw, s, r, rw, jt, jl, gh, gw, lane, count, rp, off, val, nt), ci)

    def pointwise(self, inp: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """``out[n, m] = bias[m] + Σ_k w[m, k]·inp[n, k]`` over the pixels of an NCHW-contiguous ``inp`` (N, K, H, W),
        fp32 or bf16, by the non-zeros of ``w`` (M, K, 1, 1): (N, M, H, W), NCHW, in inp's dtype (bf16 is computed
        in fp32: each 128-pixel chunk of ``inp`` is widened once, the result rounded once)."""
        n, k, h, w_ = inp.shape
        plane = h * w_
        wf = w.detach().to(torch.float32).contiguous()
        if inp.dtype != torch.bfloat16:
            out = torch.empty((n, wf.shape[0], h, w_), dtype=torch.float32)
            return self.products(inp, n, k * plane, plane, self.csr_forward(wf, plane, 1, 1), bias, out)
        rowptr, off, val = self.csr_forward(wf, PW_CHUNK, 1, 1)  # offsets k·chunk: the widened chunk's rows
        rows = rowptr.numel() - 1
        out = torch.empty((n, rows, h, w_), dtype=inp.dtype)
        b = _bias_f32(bias)
        self.lib.pointwise_nchw_bf16(inp.data_ptr(), n, k, k * plane, plane, rowptr.data_ptr(), off.data_ptr(),
                                     val.data_ptr(), rows, None if b is None else b.data_ptr(), out.data_ptr(),
                                     rows * plane, torch.get_num_threads())
        return out

    def products(self, inp: Tensor, n: int, xs: int, pixels: int, csr: tuple[Tensor, Tensor, Tensor],
                 bias: Tensor | None, out: Tensor) -> Tensor:
        """``out[i, m, p] = bias[m] + Σ_e val[e]·inp[i·xs + off[e] + p]`` for p < ``pixels`` and the n images of
        fp32 ``inp`` (csrc ``pointwise_nchw_f32``: the pointwise and the rows kernels); ``out`` (n, rows, pixels)."""
        rowptr, off, val = csr
        rows, b = rowptr.numel() - 1, _bias_f32(bias)
        self.lib.pointwise_nchw_f32(inp.data_ptr(), n, xs, pixels, rowptr.data_ptr(), off.data_ptr(),
                                    val.data_ptr(), rows, None if b is None else b.data_ptr(), out.data_ptr(),
                                    rows * pixels, torch.get_num_threads())
        return out

    def corr(self, inp: Tensor, si: int, csr: tuple[Tensor, Tensor, Tensor], t: tuple[int, int],
             u: tuple[int, int], out: Tensor, so: int, r0: int, c0: int, channel_bytes: int) -> None:
        """``out[rho, t*so + r0, u*so + c0, :] = Σ_e val[e]·inp[off[e] + (t·si·Wp + u·si)·L + lane]`` (csrc)."""
        rowptr, off, val = csr
        nrows, nch = rowptr.numel() - 1, inp.shape[0]
        _, hp, wp, lane = inp.shape
        per_block = max(1, min(nch, BLOCK_BYTES // max(channel_bytes, 1)))
        nblk = (nch + per_block - 1) // per_block
        blkptr = torch.empty(nrows * (nblk + 1), dtype=torch.int64)
        self.lib.sparse_corr_nb_f32(inp.data_ptr(), wp, lane, si, rowptr.data_ptr(), off.data_ptr(), val.data_ptr(),
                                    nrows, t[0], t[1], u[0], u[1], out.data_ptr(), out[0].numel(), out.shape[2], so,
                                    r0, c0, per_block * hp * wp * lane, nblk, blkptr.data_ptr(),
                                    torch.get_num_threads())


def _bias_f32(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach().to(torch.float32).contiguous()


def _dense_layout(t: Tensor) -> Tensor:
    """``t`` if it is NCHW- or channels-last-contiguous (the layouts the kernels read), else an NCHW copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def load_sparse_conv(required: bool = False) -> SparseConvKernels | None:
    """The compiled direct sparse convolution, built on first use; ``None`` (with a warning) where no C compiler
    works, or an error when ``required``."""
    with _lock:
        cached = _loaded.get("sparse_conv")
        if cached is None:
            try:
                path = build_library(_SOURCE, _FLAGS, "sparse_conv")
                cached = SparseConvKernels(ctypes.CDLL(str(path)), path)
            except Exception as e:  # noqa: BLE001 - any failure means "no compiled kernel"
                cached = e
            _loaded["sparse_conv"] = cached
    if isinstance(cached, Exception):
        if required:
            raise RuntimeError(f"the direct sparse convolution is unavailable ({cached}); use the dense kernels "
                               "(SWATConfig(sparse_kernels='never'))") from cached
        warnings.warn(f"direct sparse convolution unavailable ({str(cached).splitlines()[0]})", RuntimeWarning,
                      stacklevel=3)
        return None
    return cached


def unsupported(x: Tensor, w: Tensor, stride, padding, dilation, groups: int = 1) -> str | None:
    """None when the direct kernels take this convolution, else why not."""
    if x.device.type != "cpu":
        return "not on the CPU"
    if x.dtype not in TAKEN_DTYPES or w.dtype not in TAKEN_DTYPES:
        return f"dtype {x.dtype if x.dtype not in TAKEN_DTYPES else w.dtype} (fp32 or bf16 only)"
    if x.dim() != 4 or w.dim() != 4:
        return "not a 2-D convolution of a batch"
    if groups != 1:
        return "grouped conv"
    if tuple(dilation) != (1, 1):
        return "dilated conv"
    if isinstance(padding, str):
        return "string padding"
    if stride[0] != stride[1]:
        return "unequal strides"
    return None


def _require(t: Tensor, w: Tensor, stride, padding, dilation) -> None:
    why = unsupported(t, w, stride, padding, dilation)
    if why is not None:
        raise ValueError(f"the direct sparse kernel does not take this convolution ({why}); use 'csr' or dense")


def _out_hw(h: int, w: int, k: tuple[int, int], stride: int, padding) -> tuple[int, int]:
    return (h + 2 * padding[0] - k[0]) // stride + 1, (w + 2 * padding[1] - k[1]) // stride + 1


def _in_fp32(fn):
    """Run ``fn`` on fp32 copies of its bf16 tensor arguments and round the result back to the dtype of the first
    one: the kernels compute in fp32 (bf16 values widen exactly), so a bf16 call equals the fp32 one on the same
    values up to the final rounding."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        first = next(a for a in args if isinstance(a, Tensor))
        if first.dtype == torch.float32:
            return fn(*args, **kwargs)
        args = tuple(a.float() if isinstance(a, Tensor) and a.dtype == torch.bfloat16 else a for a in args)
        return fn(*args, **kwargs).to(first.dtype)
    return wrapped


@_in_fp32
def conv_forward(x: Tensor, w_s: Tensor, bias: Tensor | None, stride, padding, dilation=(1, 1),
                 kernels: SparseConvKernels | None = None) -> Tensor:
    """``conv2d(x, w_s, bias, stride, padding)`` (fp32, groups 1, dilation 1) by the direct sparse kernel, in x's
    memory format; a convolution it does not take raises ValueError (:func:`unsupported`)."""
    _require(x, w_s, stride, padding, dilation)
    kern = kernels or load_sparse_conv(required=True)
    n, _, h, w = x.shape
    k, s = tuple(w_s.shape[2:]), int(stride[0])
    ho, wo = _out_hw(h, w, k, s, padding)
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    xn = kern.pack(x, padding[0], padding[1], hp, wp)
    lane = xn.shape[3]
    csr = kern.csr_forward(w_s.detach().contiguous(), hp, wp, lane)
    y = torch.empty((w_s.shape[0], ho, wo, lane), dtype=torch.float32)
    kern.corr(xn, s, csr, (0, ho), (0, wo), y, 1, 0, 0, k[0] * (TILE_PIXELS * s + k[1]) * min(lane, 64) * 4)
    return kern.unpack(y, n, bias, memory_format_of(x) is torch.channels_last)


@_in_fp32
def conv_grad_input(g: Tensor, w_s: Tensor, x_shape, stride, padding, dilation=(1, 1),
                    kernels: SparseConvKernels | None = None) -> Tensor:
    """``dX = conv_transpose(g, w_s)`` for an input of ``x_shape`` (the gradient of :func:`conv_forward`), by the
    direct sparse kernel, one stride phase at a time, in g's memory format."""
    _require(g, w_s, stride, padding, dilation)
    kern = kernels or load_sparse_conv(required=True)
    n, _, ho, wo = g.shape
    h, w = int(x_shape[2]), int(x_shape[3])
    kh, kw = w_s.shape[2:]
    s = int(stride[0])
    jt, jl = (kh - 1) // s, (kw - 1) // s
    phases = []
    for r in range(s):  # output rows ih with (ih + padding) % s == r take the kernel rows kh % s == r
        t0, t1 = -((r - padding[0]) // s), (h - 1 + padding[0] - r) // s + 1
        for rw in range(s):
            u0, u1 = -((rw - padding[1]) // s), (w - 1 + padding[1] - rw) // s + 1
            phases.append((r, rw, (t0, t1), (u0, u1)))
    gh = jt + max([ho] + [p[2][1] for p in phases])
    gw = jl + max([wo] + [p[3][1] for p in phases])
    gn = kern.pack(g, jt, jl, gh, gw)
    lane = gn.shape[3]
    out = torch.empty((w_s.shape[1], h, w, lane), dtype=torch.float32)
    ws = w_s.detach().contiguous()
    for r, rw, t, u in phases:
        csr = kern.csr_grad_input(ws, s, r, rw, jt, jl, gh, gw, lane)
        kern.corr(gn, 1, csr, t, u, out, s, r - padding[0], rw - padding[1],
                  (jt + 1) * (TILE_PIXELS + jl + 1) * min(lane, 64) * 4)
    return kern.unpack(out, n, None, memory_format_of(g) is torch.channels_last)


def conv_grad_weight(x: Tensor, g: Tensor, w_shape, stride, padding, dilation=(1, 1), threshold: float = 0.0,
                     kernels: SparseConvKernels | None = None) -> Tensor:
    """``dW = conv2d_weight(X_s, G)`` with ``X_s = x`` where ``|x| >= threshold`` (else 0; threshold 0: the
    non-zeros of x), the dense weight gradient of :func:`conv_forward`, by the kept entries of x."""
    _require(x, g, stride, padding, dilation)
    kern = kernels or load_sparse_conv(required=True)
    xc = x.detach().contiguous()
    fn = kern.lib.sparse_grad_weight_bf16 if xc.dtype == torch.bfloat16 else kern.lib.sparse_grad_weight_f32
    return _grad_weight(kern, x.shape, x.dtype, g, w_shape, stride, padding,
                        lambda *geometry: fn(xc.data_ptr(), float(threshold), *geometry))


def packed_unsupported(positions: Tensor, values: Tensor, shape, memory_format: torch.memory_format,
                       indexed: bool) -> str | None:
    """None when :func:`conv_grad_weight_packed` reads this packed X_s, else why not."""
    if indexed:
        return "int32 indices (the mask form only)"
    if len(shape) != 4 or memory_format is not torch.contiguous_format:
        return "not an NCHW 4-D tensor"
    if values.device.type != "cpu" or values.dtype not in TAKEN_DTYPES or positions.dtype != torch.uint8:
        return f"{values.dtype} values on {values.device.type}"
    return None


def conv_grad_weight_packed(positions: Tensor, values: Tensor, x_shape, g: Tensor, w_shape, stride, padding,
                            dilation=(1, 1), kernels: SparseConvKernels | None = None) -> Tensor:
    """:func:`conv_grad_weight` of SWAT's packed ``X_s`` (``ops.sparse_storage``, the mask form of an NCHW tensor:
    1-bit mask ``positions`` and the kept ``values`` in element order), read as it is: the kept entries are listed
    from the mask's set bits, so X_s is never expanded."""
    why = unsupported(values.new_empty(()).expand(tuple(x_shape)), g, stride, padding, dilation)
    if why is not None:
        raise ValueError(f"the direct sparse kernel does not take this convolution ({why}); unpack X_s first")
    kern = kernels or load_sparse_conv(required=True)
    n, ci, h, w = (int(v) for v in x_shape)
    if positions.numel() * 8 < n * ci * h * w:
        raise ValueError(f"a mask of {positions.numel()} bytes cannot cover an X_s of {tuple(x_shape)}")
    pstart = torch.empty(n * ci, dtype=torch.int64)
    kern.lib.plane_starts(positions.data_ptr(), n * ci, h * w, pstart.data_ptr())
    vals = values.contiguous()
    bf16 = int(vals.dtype == torch.bfloat16)
    return _grad_weight(kern, x_shape, values.dtype, g, w_shape, stride, padding,
                        lambda *geometry: kern.lib.sparse_grad_weight_packed(
                            vals.data_ptr(), bf16, positions.data_ptr(), pstart.data_ptr(), *geometry))


def _grad_weight(kern: SparseConvKernels, x_shape, dtype: torch.dtype, g: Tensor, w_shape, stride, padding,
                 call) -> Tensor:
    """The shared part of the two dW paths: G padded channels-last, then ``call(N, Ci, H, W, G, GH, GW, Cp, A, B, s,
    ph, pw, KH, KW, nb, out, nt)`` into (Ci, KH, KW, Cp), transposed to (Co, Ci, KH, KW) in ``dtype``."""
    n, ci, h, w = (int(v) for v in x_shape)
    co, kh, kw = int(w_shape[0]), int(w_shape[2]), int(w_shape[3])
    s = int(stride[0])
    _, _, ho, wo = g.shape
    # row q = (ih + p) // s of an entry reads G rows q - j, j <= (k - 1) // s: pad G so that all of them exist
    top, left = max(0, -((padding[0] - kh + 1) // s)), max(0, -((padding[1] - kw + 1) // s))
    gh = top + max(ho, (h - 1 + padding[0]) // s + 1)
    gw = left + max(wo, (w - 1 + padding[1]) // s + 1)
    cp, nt = (co + 15) // 16 * 16, torch.get_num_threads()  # G's channels: whole 16-float vectors
    g = _dense_layout(g.to(torch.float32))  # bf16: G widened (x is read as it is)
    gp = torch.empty((n, gh, gw, cp), dtype=torch.float32)
    kern.lib.nhwc_pad_f32(g.data_ptr(), n, co, ho, wo, int(memory_format_of(g) is torch.channels_last), top, left,
                          gh, gw, cp, gp.data_ptr(), nt)
    nb = max(1, min(n, BLOCK_BYTES // (gh * gw * cp * 4)))  # images whose G stays in the L2 cache together
    dwt = torch.empty((ci, kh, kw, cp), dtype=torch.float32)
    call(n, ci, h, w, gp.data_ptr(), gh, gw, cp, top, left, s, padding[0], padding[1], kh, kw, nb, dwt.data_ptr(), nt)
    dw = torch.empty((co, ci, kh, kw), dtype=torch.float32)
    kern.lib.transpose_rows_f32(dwt.data_ptr(), ci * kh * kw, cp, co, dw.data_ptr(), nt)
    return dw.to(dtype)


def pointwise_unsupported(x: Tensor, w: Tensor, stride, padding, dilation, groups: int = 1,
                          layout: bool = True) -> str | None:
    """None when the pointwise kernel takes this convolution (one the direct kernels take, 1×1, unpadded; with
    ``layout``, an NCHW input: the kernels take any layout, but another one pays a copy in and out), else why not."""
    return _first_reason(unsupported(x, w, stride, padding, dilation, groups), x if layout else None,
                         (tuple(w.shape[2:]) != (1, 1), "not a 1x1 conv"),
                         (tuple(padding) != (0, 0), "a padded 1x1 conv"))


def _first_reason(why: str | None, nchw: Tensor | None, *checks: tuple[bool, str]) -> str | None:
    """``why``, else the reason of the first failed check, else "not NCHW" when ``nchw`` is given and is not."""
    for bad, reason in checks:
        if why is None and bad:
            why = reason
    if why is None and nchw is not None and not nchw.is_contiguous():
        why = "not NCHW (a channels-last input takes the batch-innermost kernel)"
    return why


def _require_layout_kernel(name: str, check, t: Tensor, w: Tensor, stride, padding, dilation) -> None:
    """Raise ValueError naming the fix when the ``name`` kernel (``check``: its ``*_unsupported``) does not take
    this convolution (any memory format: another one than NCHW is copied in and out)."""
    why = check(t, w, stride, padding, dilation, layout=False)
    if why is not None:
        raise ValueError(f"the {name} sparse kernel does not take this convolution ({why}); use 'direct' or dense")


def pointwise_forward(x: Tensor, w_s: Tensor, bias: Tensor | None, stride, padding=(0, 0), dilation=(1, 1),
                      kernels: SparseConvKernels | None = None) -> Tensor:
    """``conv2d(x, w_s, bias, stride)`` of a 1×1 ``w_s`` by the pointwise kernel (a stride s reads every s-th pixel,
    copied out first), in x's memory format (another one than NCHW is copied in and out)."""
    _require_layout_kernel("pointwise", pointwise_unsupported, x, w_s, stride, padding, dilation)
    kern = kernels or load_sparse_conv(required=True)
    s, fmt = int(stride[0]), memory_format_of(x)
    xs = (x[:, :, ::s, ::s] if s > 1 else x).contiguous()
    return kern.pointwise(xs, w_s, bias).contiguous(memory_format=fmt)


def pointwise_grad_input(g: Tensor, w_s: Tensor, x_shape, stride, padding=(0, 0), dilation=(1, 1),
                         kernels: SparseConvKernels | None = None) -> Tensor:
    """``dX = conv_transpose(g, w_s)`` of :func:`pointwise_forward`: ``W_sᵀ · G`` per image (the CSR of the
    transposed weight), scattered to every s-th pixel of a zero ``dX`` when the stride s > 1."""
    _require_layout_kernel("pointwise", pointwise_unsupported, g, w_s, stride, padding, dilation)
    kern = kernels or load_sparse_conv(required=True)
    co, ci = int(w_s.shape[0]), int(w_s.shape[1])
    fmt, g = memory_format_of(g), g.contiguous()
    wt = w_s.detach().reshape(co, ci).t().contiguous().view(ci, co, 1, 1)
    dxs = kern.pointwise(g, wt, None)
    s = int(stride[0])
    if tuple(dxs.shape) == tuple(x_shape):
        return dxs.contiguous(memory_format=fmt)
    dx = torch.empty(tuple(x_shape), dtype=g.dtype, memory_format=fmt).zero_()
    dx[:, :, ::s, ::s] = dxs
    return dx


def rows_unsupported(x: Tensor, w: Tensor, stride, padding, dilation, groups: int = 1,
                     layout: bool = True) -> str | None:
    """None when the rows kernel takes this convolution (fp32, k×k with k > 1, stride 1, padding below the kernel
    size; with ``layout``, an NCHW input: another layout pays a copy in and out), else why not."""
    kh, kw = (int(v) for v in w.shape[2:]) if w.dim() == 4 else (1, 1)
    return _first_reason(unsupported(x, w, stride, padding, dilation, groups), x if layout else None,
                         (x.dtype != torch.float32, f"dtype {x.dtype} (the rows kernel is fp32 only)"),
                         ((kh, kw) == (1, 1), "a 1x1 conv (the pointwise kernel's)"),
                         (int(stride[0]) != 1, "a strided conv"),
                         (not (0 <= padding[0] < kh and 0 <= padding[1] < kw), "padding as large as the kernel"))


def _rows_correlation(kern: SparseConvKernels, x: Tensor, w: Tensor, bias: Tensor | None, pad: tuple[int, int]
                      ) -> Tensor:
    """The stride-1 correlation of ``x`` (N, C, H, W) zero-padded by ``pad`` with ``w`` (M, C, kh, kw), as the
    pointwise kernel over the padded width: output pixel q = oh·Wp + ow of an image reads input q + kh·Wp + kw,
    so every non-zero weight multiplies a contiguous run of the padded rows. Returns (N, M, Ho, Wp): the columns from
    Wo on are scratch (they read across a row's end; the caller drops them)."""
    n, c, h, wd = x.shape
    m, _, kh, kw = (int(v) for v in w.shape)
    hp, wp = h + 2 * pad[0], wd + 2 * pad[1]
    ho, plane = hp - kh + 1, hp * wp
    buf = torch.empty(n * c * plane + kw, dtype=torch.float32)  # the last scratch column reads kw - 2 past the end
    buf[n * c * plane:].zero_()
    xp = buf[:n * c * plane].view(n, c, hp, wp)
    if pad[0]:
        xp[:, :, :pad[0]].zero_()
        xp[:, :, hp - pad[0]:].zero_()
    if pad[1]:
        xp[:, :, :, :pad[1]].zero_()
        xp[:, :, :, wp - pad[1]:].zero_()
    xp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd].copy_(x)
    csr = kern.csr_forward(w.detach().to(torch.float32).contiguous(), hp, wp, 1)  # offsets (ci·Hp + kh)·Wp + kw
    return kern.products(xp, n, c * plane, ho * wp, csr, bias, torch.empty((n, m, ho, wp), dtype=torch.float32))


def rows_forward(x: Tensor, w_s: Tensor, bias: Tensor | None, stride, padding, dilation=(1, 1),
                 kernels: SparseConvKernels | None = None) -> Tensor:
    """``conv2d(x, w_s, bias, 1, padding)`` of a k×k ``w_s`` by the rows kernel (NCHW, the pixels of each padded
    row innermost: the width-innermost layout), in x's memory format; the padded copy of x and the cropped copy of
    the output are part of every call."""
    _require_layout_kernel("rows", rows_unsupported, x, w_s, stride, padding, dilation)
    kern = kernels or load_sparse_conv(required=True)
    wo = x.shape[3] + 2 * padding[1] - w_s.shape[3] + 1
    y = _rows_correlation(kern, x, w_s, bias, (padding[0], padding[1]))
    return y[..., :wo].contiguous(memory_format=memory_format_of(x))


def rows_grad_input(g: Tensor, w_s: Tensor, x_shape, stride, padding, dilation=(1, 1),
                    kernels: SparseConvKernels | None = None) -> Tensor:
    """``dX = conv_transpose(g, w_s)`` of :func:`rows_forward`: the correlation of G, padded by ``k - 1 - p``, with
    the flipped, transposed weight (stride 1), in g's memory format."""
    _require_layout_kernel("rows", rows_unsupported, g, w_s, stride, padding, dilation)
    kern = kernels or load_sparse_conv(required=True)
    kh, kw = (int(v) for v in w_s.shape[2:])
    wt = w_s.detach().flip(2, 3).transpose(0, 1)
    dx = _rows_correlation(kern, g, wt, None, (kh - 1 - padding[0], kw - 1 - padding[1]))
    return dx[..., :int(x_shape[3])].contiguous(memory_format=memory_format_of(g))


def linear_unsupported(x: Tensor, w: Tensor) -> str | None:
    """None when the compiled kernels take this linear layer (fp32 or bf16, CPU), else why not."""
    if x.device.type != "cpu":
        return "not on the CPU"
    if x.dtype not in TAKEN_DTYPES or w.dtype not in TAKEN_DTYPES:
        return f"dtype {x.dtype if x.dtype not in TAKEN_DTYPES else w.dtype} (fp32 or bf16 only)"
    return None


def _require_linear(x: Tensor, w: Tensor) -> None:
    why = linear_unsupported(x, w)
    if why is not None:
        raise ValueError(f"the compiled sparse kernels do not take this linear layer ({why}); use 'csr' or dense")


def _rows_times(kern: SparseConvKernels, a: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``a @ wᵀ (+ bias)`` for a (M, K) ``a`` and a sparse (R, K) ``w``, as the pointwise kernel's ``w · aᵀ``
    over one 'image' of M pixels: (M, R)."""
    m, k = a.shape
    at = a.t().contiguous().view(1, k, 1, m)
    return kern.pointwise(at, w.reshape(w.shape[0], k, 1, 1), bias).view(w.shape[0], m).t()


def linear_forward(x: Tensor, w_s: Tensor, bias: Tensor | None, kernels: SparseConvKernels | None = None) -> Tensor:
    """``F.linear(x, w_s, bias)`` (x: (..., in)) by the pointwise kernel on the transposed rows."""
    _require_linear(x, w_s)
    kern = kernels or load_sparse_conv(required=True)
    y = _rows_times(kern, x.reshape(-1, w_s.shape[1]), w_s.detach(), bias)
    return y.contiguous().view(*x.shape[:-1], w_s.shape[0])


def linear_grad_input(g: Tensor, w_s: Tensor, x_shape, kernels: SparseConvKernels | None = None) -> Tensor:
    """``dX = G @ W_s`` of :func:`linear_forward`: ``G @ (W_sᵀ)ᵀ`` with the CSR of ``W_sᵀ``."""
    _require_linear(g, w_s)
    kern = kernels or load_sparse_conv(required=True)
    dx = _rows_times(kern, g.reshape(-1, w_s.shape[0]), w_s.detach().t(), None)
    return dx.contiguous().view(tuple(x_shape))


def linear_grad_weight(x: Tensor, g: Tensor, w_shape, threshold: float = 0.0,
                       kernels: SparseConvKernels | None = None) -> Tensor:
    """``dW = Gᵀ @ X_s`` (dense) from the entries of ``x`` with ``|x| >= threshold``: the direct dW kernel of a 1×1
    conv over (rows, in, 1, 1)."""
    _require_linear(x, g)
    out_f, in_f = int(w_shape[0]), int(w_shape[1])
    x4, g4 = x.reshape(-1, in_f, 1, 1), g.reshape(-1, out_f, 1, 1)
    return conv_grad_weight(x4, g4, (out_f, in_f, 1, 1), (1, 1), (0, 0), threshold=threshold,
                            kernels=kernels).view(out_f, in_f)
