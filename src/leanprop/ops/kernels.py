"""Compiled CPU kernels the methods share (BLPA's fused unit, SWAT's sparse storage, the mask-ReLU;
``csrc/kernels.c``), with the torch-ops fallback.

The C source is compiled once per machine with the system C compiler (``cc -O3 -fopenmp``) into the
leanprop cache (``$LEANPROP_CACHE/kernels``) and loaded with ctypes; no PyTorch headers are needed, so
the build takes about a second. Where no compiler works, ``kernels="auto"`` falls back to torch ops (same
results, slower) with one warning; ``kernels="c"`` raises instead. Eager only (not traceable).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from leanprop.utils import cache_dir, file_lock

__all__ = ["CKernels", "affine_layout", "build_library", "load_kernels", "kernel_layout"]

_SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
# -fno-trapping-math lets floorf vectorise; none of these flags changes a result (no fast-math)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC",
          "-shared"]
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_lock = threading.Lock()
_loaded: dict[str, CKernels | Exception] = {}


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(cc: str, src: Path, out: Path, flags: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        proc = subprocess.run([cc, *flags, str(src), "-o", str(tmp_so)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src.name} with {cc} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp_so, out)


def build_library(src: Path, flags: list[str], stem: str) -> Path:
    """The shared library compiled from ``src`` with ``flags`` for this machine, built once into the leanprop cache
    (keyed by the source, compiler, flags and CPU) under a file lock, so concurrent processes build it once."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    digest = hashlib.sha256(src.read_bytes() + " ".join([cc, *flags, _cpu_id(), platform.machine()]).encode()
                            ).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"{stem}_{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(out.with_suffix(".lock")):
            if not out.exists():
                _compile(cc, src, out, flags)
    return out


class CKernels:
    """ctypes bindings of the compiled kernels. Activations must be CPU fp32/bf16, NCHW- or channels-last-
    contiguous, with rows (an H*W plane, or the C channels of a pixel) a whole number of bytes long when
    packed (:meth:`supports`); codes are passed around packed."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.lib = lib
        self.path = path
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.blpa_pack.argtypes = [p, i64, i32, p, i32]
        lib.blpa_unpack.argtypes = [p, i64, i32, p, i32]
        lib.group_encode_f32.argtypes = [p, p, i64, i64, i32, i32, p, p, p, i32]
        lib.group_decode_f32.argtypes = [p, p, p, i64, i64, i32, p, i32]
        lib.group_decode_chain_f32.argtypes = [p, i32, i64, i64, i64, i64, p, p, i32]
        for suf in _SUFFIX.values():
            getattr(lib, f"group_encode_affine_{suf}").argtypes = [p, p, p, i64, i64, p, i64, i64, i32, p, p, p, i32]
            getattr(lib, f"group_decode_affine_{suf}").argtypes = [p, p, p, i64, i64, i32, p, p, i64, i64, p, p, p,
                                                                   ctypes.c_float, ctypes.c_float, p, i32]
            getattr(lib, f"range_bits_{suf}").argtypes = [p, i64, ctypes.c_float, ctypes.c_float, p, p, i32]
            getattr(lib, f"blpa_encode_{suf}").argtypes = [p, p, p, i64, i64, i64, i32, i32, i32, p, i32]
            getattr(lib, f"blpa_decode_z_{suf}").argtypes = [p, p, i64, i64, i64, i32, i32, p, i32]
            getattr(lib, f"blpa_bn_sums_{suf}").argtypes = [p, p, p, i64, i64, i64, i32, i32, p, i32]
            getattr(lib, f"blpa_bn_grad_input_{suf}").argtypes = [p, p, p, p, p, i64, i64, i64, i32, i32, p, i32]
            getattr(lib, f"swat_mask_count_{suf}").argtypes = [p, i64, ctypes.c_float, i64, i64, p, p, i32]
            getattr(lib, f"positive_bits_{suf}").argtypes = [p, i64, p, i32]
            getattr(lib, f"mask_values_{suf}").argtypes = [p, i64, ctypes.c_float, ctypes.c_float, p, i32]
            getattr(lib, f"swat_compact_{suf}").argtypes = [p, i64, p, i64, i64, p, p, i32]
            getattr(lib, f"swat_expand_{suf}").argtypes = [p, i64, p, i64, i64, p, p, i32]
            getattr(lib, f"relu_mask_{suf}").argtypes = [p, i64, p, p, i32]
            getattr(lib, f"relu_mask_backward_{suf}").argtypes = [p, p, i64, p, i32]

    def __deepcopy__(self, memo: dict) -> CKernels:
        return self  # one loaded library per process: a deep copy of a converted model shares it

    @staticmethod
    def supports(bits: int, *tensors: torch.Tensor) -> bool:
        """Whether these tensors (same shape) can go through the kernels with ``bits``-bit codes."""
        if bits not in (1, 2, 4, 8) or not all(t.device.type == "cpu" and t.dtype in _SUFFIX for t in tensors):
            return False
        try:
            layouts = {kernel_layout(t) for t in tensors}
        except ValueError:
            return False
        if len(layouts) != 1:
            return False
        n, c, inner, cl = layouts.pop()
        return (c if cl else inner) % (8 // bits) == 0

    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        _require_cpu(codes)
        k = 8 // bits
        out = torch.empty((codes.numel() + k - 1) // k, dtype=torch.uint8)
        self.lib.blpa_pack(codes.data_ptr(), codes.numel(), bits, out.data_ptr(), torch.get_num_threads())
        return out

    def group_encode(self, groups: torch.Tensor, bits: int, seeds: torch.Tensor | None = None,
                     exact_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(packed codes, lo, step)`` of a contiguous fp32 ``(ngroups, G)`` tensor: per-group min and step,
        nearest rounding, or stochastic with one int64 ``seeds`` entry per group (:class:`leanprop.ops.codec`);
        ``exact_zero``: in a group whose minimum is 0, positive values get a code of 1 or more."""
        _require_cpu(groups)
        ng, g = groups.shape
        packed = torch.empty(ng * g * bits // 8, dtype=torch.uint8)
        lo, step = torch.empty(ng, 1), torch.empty(ng, 1)
        self.lib.group_encode_f32(groups.data_ptr(), None if seeds is None else seeds.data_ptr(), ng, g, bits,
                                  int(exact_zero), packed.data_ptr(), lo.data_ptr(), step.data_ptr(),
                                  torch.get_num_threads())
        return packed, lo, step

    def group_decode(self, packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int,
                     group: int) -> torch.Tensor:
        """Inverse of :meth:`group_encode`: the ``(ngroups, G)`` fp32 values ``lo + q * step``."""
        _require_cpu(packed, lo, step)
        ng = lo.numel()
        out = torch.empty(ng, group)
        self.lib.group_decode_f32(packed.data_ptr(), lo.data_ptr(), step.data_ptr(), ng, group, bits,
                                  out.data_ptr(), torch.get_num_threads())
        return out

    def group_encode_affine(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, bits: int, group: int,
                            seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`group_encode` of ``(x - shift[c]) * scale[c]`` in the memory order of an fp32/bf16 ``x`` that is
        NCHW- or channels-last-contiguous (:func:`affine_layout`; numel a multiple of ``group``; ``shift``/``scale``:
        contiguous fp32 ``(C,)``) without materialising it."""
        _require_cpu(x, shift, scale)
        c, inner = affine_layout(x)
        ng = x.numel() // group
        packed = torch.empty(ng * group * bits // 8, dtype=torch.uint8)
        lo, step = torch.empty(ng, 1), torch.empty(ng, 1)
        getattr(self.lib, f"group_encode_affine_{_SUFFIX[x.dtype]}")(
            x.data_ptr(), shift.data_ptr(), scale.data_ptr(), c, inner, None if seeds is None else seeds.data_ptr(),
            ng, group, bits, packed.data_ptr(), lo.data_ptr(), step.data_ptr(), torch.get_num_threads())
        return packed, lo, step

    def group_decode_affine(self, packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int, group: int,
                            shape: tuple[int, ...], scale: torch.Tensor | None, shift: torch.Tensor | None,
                            mask: torch.Tensor | None = None, addend: torch.Tensor | None = None,
                            dtype: torch.dtype = torch.float32, channels_last: bool = False,
                            clamp: tuple[float, float, torch.Tensor] | None = None) -> torch.Tensor:
        """``(lo + q * step) * scale[c] + shift[c] (+ addend)`` as a ``dtype`` (fp32/bf16) tensor of ``shape``, laid
        out as the encoded tensor was (``channels_last`` or NCHW), zero where the packed ``mask`` (NumPy packbits
        order, same memory order) is clear; ``addend``: a tensor of ``shape``. ``clamp = (lo, hi, above)``: where
        ``mask`` is clear, ``hi`` if the packed ``above`` is set, else ``lo`` (a clamp of the value, e.g. ReLU6)."""
        _require_cpu(packed, lo, step)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if addend is not None:
            addend = addend.to(torch.float32).contiguous(memory_format=fmt)
        out = torch.empty(shape, dtype=dtype, memory_format=fmt)
        c, inner = affine_layout(out)
        getattr(self.lib, f"group_decode_affine_{_SUFFIX[dtype]}")(
            packed.data_ptr(), lo.data_ptr(), step.data_ptr(), lo.numel(), group, bits,
            None if scale is None else scale.data_ptr(), None if shift is None else shift.data_ptr(), c, inner,
            None if addend is None else addend.data_ptr(), None if mask is None else mask.data_ptr(),
            None if clamp is None else clamp[2].data_ptr(), 0.0 if clamp is None else clamp[0],
            0.0 if clamp is None else clamp[1], out.data_ptr(), torch.get_num_threads())
        return out

    def group_decode_chain(self, levels: list[tuple], group: int, shape: tuple[int, ...],
                           base: torch.Tensor | None, channels_last: bool = False) -> torch.Tensor:
        """A chain of residual outputs in one pass (fp32): ``acc = base`` (or 0), then for each level ``(packed, lo,
        step, bits, scale, shift, mask)``, innermost first, ``acc = mask * ((lo + q * step) * scale[c] + shift[c] +
        acc)`` -- what :meth:`group_decode_affine` gives level by level with the previous level as its addend,
        without writing the levels in between. All levels share ``shape``, layout and ``group``."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(shape, dtype=torch.float32, memory_format=fmt)
        if base is not None:
            base = base.to(torch.float32).contiguous(memory_format=fmt)
        table = torch.tensor([[0 if t is None else t.data_ptr() for t in (packed, lo, step, scale, shift, mask)]
                              + [bits] for packed, lo, step, bits, scale, shift, mask in levels], dtype=torch.int64)
        _require_cpu(*(lv[0] for lv in levels))
        c, inner = affine_layout(out)
        self.lib.group_decode_chain_f32(table.data_ptr(), len(levels), levels[0][1].numel(), group, c, inner,
                                        None if base is None else base.data_ptr(), out.data_ptr(),
                                        torch.get_num_threads())
        return out

    def unpack(self, packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
        _require_cpu(packed)
        out = torch.empty(numel, dtype=torch.uint8)
        self.lib.blpa_unpack(packed.data_ptr(), numel, bits, out.data_ptr(), torch.get_num_threads())
        return out

    def encode(self, x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, bits: int, relu_inplace: bool
               ) -> torch.Tensor:
        """Packed codes (memory order of ``x``); ``y`` (same layout) becomes ReLU(y) if asked."""
        _require_cpu(x, y, coef)
        n, c, inner, cl, p = _geometry(x)
        packed = torch.empty(x.numel() * bits // 8, dtype=torch.uint8)
        getattr(self.lib, f"blpa_encode_{_SUFFIX[x.dtype]}")(
            x.data_ptr(), y.data_ptr(), _transposed(coef, p), n, c, inner, cl, bits, int(relu_inplace),
            packed.data_ptr(), torch.get_num_threads())
        return packed

    def decode_z(self, packed: torch.Tensor, coef: torch.Tensor, bits: int, like: torch.Tensor) -> torch.Tensor:
        """z~ as a tensor with the shape, layout and dtype of ``like``."""
        _require_cpu(packed, coef, like)
        z = torch.empty_like(like)
        n, c, inner, cl, p = _geometry(like)
        getattr(self.lib, f"blpa_decode_z_{_SUFFIX[like.dtype]}")(
            packed.data_ptr(), _transposed(coef, p), n, c, inner, cl, bits, z.data_ptr(), torch.get_num_threads())
        return z

    # ------------------------------------------------------------------ SWAT sparse storage
    SPARSE_CHUNK = 1 << 16  # elements per chunk of the sparse pack (a multiple of 8)

    def sparse_pack(self, flat: torch.Tensor, thr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mask bits, kept values, chunk offsets)`` of a contiguous 1-D fp32/bf16 tensor, keep = ``|x| >= thr``
        (``thr`` an fp32 value). The mask is laid out as ``pack_bits(keep, 1)``."""
        _require_cpu(flat)
        n, chunk = flat.numel(), self.SPARSE_CHUNK
        nch = max(1, -(-n // chunk))
        bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
        counts = torch.empty(nch, dtype=torch.int64)
        suf, nt = _SUFFIX[flat.dtype], torch.get_num_threads()
        getattr(self.lib, f"swat_mask_count_{suf}")(flat.data_ptr(), n, thr, chunk, nch, bits.data_ptr(),
                                                    counts.data_ptr(), nt)
        offsets = torch.zeros(nch, dtype=torch.int64)
        torch.cumsum(counts[:-1], 0, out=offsets[1:])
        values = torch.empty(int(offsets[-1] + counts[-1]), dtype=flat.dtype)
        getattr(self.lib, f"swat_compact_{suf}")(flat.data_ptr(), n, bits.data_ptr(), chunk, nch,
                                                 offsets.data_ptr(), values.data_ptr(), nt)
        return bits, values, offsets

    def sparse_expand(self, bits: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
        """Inverse of :meth:`sparse_pack`: the flat dense tensor (zeros where the mask is 0)."""
        _require_cpu(bits, values, offsets)
        out = torch.empty(n, dtype=values.dtype)
        getattr(self.lib, f"swat_expand_{_SUFFIX[values.dtype]}")(
            values.data_ptr(), n, bits.data_ptr(), self.SPARSE_CHUNK, offsets.numel(), offsets.data_ptr(),
            out.data_ptr(), torch.get_num_threads())
        return out

    def relu_mask(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ReLU(x), [x > 0] as 1-bit packed)`` of a contiguous 1-D fp32/bf16 tensor, in one pass."""
        _require_cpu(flat)
        n = flat.numel()
        out, bits = torch.empty_like(flat), torch.empty((n + 7) // 8, dtype=torch.uint8)
        getattr(self.lib, f"relu_mask_{_SUFFIX[flat.dtype]}")(flat.data_ptr(), n, out.data_ptr(), bits.data_ptr(),
                                                              torch.get_num_threads())
        return out, bits

    def positive_bits(self, flat: torch.Tensor) -> torch.Tensor:
        """``[x > 0]`` as 1-bit packed (NumPy packbits order) of a contiguous 1-D fp32/bf16 tensor, in one pass."""
        _require_cpu(flat)
        n = flat.numel()
        bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
        getattr(self.lib, f"positive_bits_{_SUFFIX[flat.dtype]}")(flat.data_ptr(), n, bits.data_ptr(),
                                                                  torch.get_num_threads())
        return bits

    def range_bits(self, flat: torch.Tensor, lo: float, hi: float, above: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[lo < x < hi]`` and, if ``above``, ``[x >= hi]`` as 1-bit packed (NumPy packbits order) of a contiguous
        1-D fp32/bf16 tensor, in one pass."""
        _require_cpu(flat)
        n = flat.numel()
        inside = torch.empty((n + 7) // 8, dtype=torch.uint8)
        top = torch.empty((n + 7) // 8, dtype=torch.uint8) if above else None
        getattr(self.lib, f"range_bits_{_SUFFIX[flat.dtype]}")(flat.data_ptr(), n, lo, hi, inside.data_ptr(),
                                                               None if top is None else top.data_ptr(),
                                                               torch.get_num_threads())
        return inside, top

    def mask_values(self, bits: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, inside: float,
                    outside: float, channels_last: bool = False) -> torch.Tensor:
        """A ``dtype`` (fp32/bf16) tensor of ``shape`` holding ``inside`` where the packed mask (NumPy packbits
        order over the memory order: NCHW, or NHWC for ``channels_last``) is set and ``outside`` elsewhere."""
        _require_cpu(bits)
        out = torch.empty(shape, dtype=dtype,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        getattr(self.lib, f"mask_values_{_SUFFIX[dtype]}")(bits.data_ptr(), out.numel(), inside, outside,
                                                           out.data_ptr(), torch.get_num_threads())
        return out

    def relu_mask_backward(self, g_flat: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """``g`` where the packed mask is set, else 0 (contiguous 1-D fp32/bf16 ``g``)."""
        _require_cpu(g_flat, bits)
        gx = torch.empty_like(g_flat)
        getattr(self.lib, f"relu_mask_backward_{_SUFFIX[g_flat.dtype]}")(
            g_flat.data_ptr(), bits.data_ptr(), g_flat.numel(), gx.data_ptr(), torch.get_num_threads())
        return gx

    def bn_sums(self, packed: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, bits: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (sum m*g, sum m*g*xhat~), fp32 (rows reduced in fp64)."""
        _require_cpu(packed, g, coef)
        n, c, inner, cl, p = _geometry(g)
        nt = torch.get_num_threads()
        partial = torch.zeros(nt, 2, c, dtype=torch.float64) if cl else torch.empty(n, c, 2, dtype=torch.float32)
        getattr(self.lib, f"blpa_bn_sums_{_SUFFIX[g.dtype]}")(
            packed.data_ptr(), g.data_ptr(), _transposed(coef, p), n, c, inner, cl, bits, partial.data_ptr(), nt)
        if cl:
            s = partial.view(nt, 2, p, c // p).sum((0, 2)).float()
            return s[0].contiguous(), s[1].contiguous()
        s = partial.sum(0, dtype=torch.float64).float()
        return s[:, 0].contiguous(), s[:, 1].contiguous()

    def bn_grad_input(self, packed: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, mean1: torch.Tensor,
                      mean2: torch.Tensor, bits: int) -> torch.Tensor:
        """g_x = K*(m*g - mean1 - xhat~*mean2), same shape, layout and dtype as ``g``."""
        _require_cpu(packed, g, coef, mean1, mean2)
        gx = torch.empty_like(g)
        n, c, inner, cl, p = _geometry(g)
        m1, m2 = mean1.float().repeat(p), mean2.float().repeat(p)  # keep references during the call
        getattr(self.lib, f"blpa_bn_grad_input_{_SUFFIX[g.dtype]}")(
            packed.data_ptr(), g.data_ptr(), _transposed(coef, p), m1.data_ptr(), m2.data_ptr(), n, c, inner, cl, bits,
            gx.data_ptr(), torch.get_num_threads())
        return gx


def _require_cpu(*tensors: torch.Tensor) -> None:
    """The kernels read raw host pointers: a tensor on any other device is refused, never passed to C."""
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"BLPA C kernels take CPU tensors only, got one on {t.device}; the callers route other "
                             "devices to the torch ops")


_CHUNK = 2048  # CH in the C source


def _geometry(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(N, C, inner, channels_last, P) as the kernels see ``t``: a channels-last tensor is walked as rows of
    P pixels, i.e. P*C "virtual channels" with per-channel tables tiled P times, so short rows (C = 16)
    still vectorise."""
    n, c, inner, cl = kernel_layout(t)
    if not cl:
        return n, c, inner, 0, 1
    p = math.gcd(n * inner, max(1, _CHUNK // c))
    return n * inner // p, c * p, 1, 1, p


def _transposed(coef: torch.Tensor, p: int = 1) -> int:
    """Pointer to a (NCOEF, P*C) fp32 copy of the table (tiled P times); kept alive on the table itself."""
    cache = coef.__dict__.setdefault("_blpa_t", {})
    if p not in cache:
        cache[p] = coef.float().t().repeat(1, p).contiguous()
    return cache[p].data_ptr()


def kernel_layout(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(N, C, inner, channels_last) of a tensor the kernels can walk; raises if its layout is neither."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = t.shape
        return n, c, h * w, 1
    if not t.is_contiguous():
        raise ValueError("BLPA kernels need an NCHW- or channels-last-contiguous tensor")
    n, c = t.shape[0], t.shape[1]
    return n, c, t[0, 0].numel() if t.dim() > 2 else 1, 0


def affine_layout(t: torch.Tensor) -> tuple[int, int]:
    """``(C, inner)`` of the group-affine kernels for ``t`` in its memory order: the channel of element ``i`` is
    ``(i // inner) % C`` (NCHW-contiguous: ``inner = H * W``; 4-D channels-last: ``inner = 1``)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.shape[1], 1
    if not t.is_contiguous():
        raise ValueError("the group-affine kernels need an NCHW- or channels-last-contiguous tensor")
    return t.shape[1], t[0, 0].numel()


def load_kernels(required: bool = False) -> CKernels | None:
    """The compiled kernels, building them on first use; ``None`` (with a warning) if that is impossible."""
    key = "blpa"
    with _lock:
        cached = _loaded.get(key)
        if cached is None:
            try:
                cached = _build()
            except Exception as e:  # noqa: BLE001 - any failure means "no compiled kernels"
                cached = e
            _loaded[key] = cached
    if isinstance(cached, Exception):
        if required:
            raise RuntimeError(f"BLPA C kernels unavailable ({cached}); use BLPAConfig(kernels='torch')") from cached
        warnings.warn(f"BLPA: compiled kernels unavailable, using slower torch ops ({str(cached).splitlines()[0]})",
                      RuntimeWarning, stacklevel=3)
        return None
    return cached


def _build() -> CKernels:
    out = build_library(_SOURCE, _FLAGS, "blpa")
    return CKernels(ctypes.CDLL(str(out)), out)
