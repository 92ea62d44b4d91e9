"""The saved-tensor storage policy (leanprop.ops.codec, ``by_op=True``): what each op keeps, exactness where the
representation is exact, gradient cosines of the K-bit codes, deterministic stochastic rounding, and BLPA's use of
it on models written the way users write them (tests/user_models.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanprop
from leanprop import models
from leanprop.accounting.memory import saved_bytes
from leanprop.blpa.config import BLPAConfig
from leanprop.ops.codec import OP_KINDS, SavedTensorCodec, op_kind

from .user_models import USER_MODELS, example_batch


class _Ops(nn.Module):
    """One of every op kind the policy treats specially, called functionally and through modules."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(x)) + x)                  # BN -> add -> shared ReLU module
        x = F.max_pool2d(x, 2)
        x = F.relu6(self.dw(x))
        x = F.leaky_relu(x, 0.1)
        x = F.hardtanh(x, -0.5, 2.0)
        x = x * torch.sigmoid(F.silu(x))                         # squeeze-excite style gate
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.gelu(F.avg_pool2d(x, 2))
        return self.fc(self.drop(torch.flatten(x, 1)))


def _grads(model, x, y):
    torch.manual_seed(7)  # the same dropout mask in every run
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _with_codec(model, bits, **kw):
    m = copy.deepcopy(model)
    codec = SavedTensorCodec(bits, 0, by_op=True, **kw)
    codec.attach(m)
    return m, codec


def test_op_kinds_cover_what_users_call():
    assert op_kind(F.relu) == op_kind(torch.relu) == op_kind(torch.Tensor.relu_) == "relu"
    assert op_kind(F.relu6) == op_kind(F.hardtanh) == "hardtanh" and op_kind(F.leaky_relu) == "leaky_relu"
    assert op_kind(F.max_pool2d) == "max_pool" and op_kind(F.adaptive_avg_pool2d) == "avg_pool"
    assert op_kind(F.conv2d) == "conv" and op_kind(F.linear) == "linear" and op_kind(F.batch_norm) == "batch_norm"
    assert op_kind(F.layer_norm) == op_kind(F.group_norm) == "norm" and op_kind(F.silu) == "smooth"
    assert op_kind(torch.add) == "other" and set(OP_KINDS) >= {"dropout", "smooth", "norm"}


def test_32_bit_policy_is_exact_and_keeps_masks_shapes_and_narrow_indices():
    torch.manual_seed(0)
    model = _Ops()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    m, codec = _with_codec(model, 32)
    assert torch.equal(_grads(m, x, y), _grads(model, x, y))  # masks and shapes rebuild what backward reads
    # relu (x2), relu6, leaky_relu, hardtanh: 1-bit masks; dropout's bool mask: 1 bit
    assert codec.stats["masks"] == 6 and codec.stats["shape_only"] == 2 and codec.stats["indices"] == 1
    kept = saved_bytes(m, x)
    assert kept.by_kind["mask"] < 0.05 * kept.total_bytes and kept.by_kind["index"] == 4 * 16 * 8 * 8 * 2


@pytest.mark.parametrize("pool", [lambda t: F.adaptive_max_pool2d(t, 4), nn.AdaptiveMaxPool2d((4, 2)),
                                  lambda t: F.adaptive_max_pool1d(t.flatten(2), 8).unsqueeze(-1)])
def test_adaptive_max_pool_keeps_narrow_indices_and_the_input_shape_only(pool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), _Lambda(pool), nn.Flatten(),
                          nn.LazyLinear(10))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    model(x)  # materialise the lazy layer
    m, codec = _with_codec(model, 32)
    assert torch.equal(_grads(m, x, y), _grads(model, x, y))
    assert codec.stats["shape_only"] == 1 and codec.stats["indices"] == 1
    pooled = model[:4](x).numel()
    assert saved_bytes(m, x).by_kind["index"] == 2 * pooled  # the window indices as int16, not int64


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _ChunkNet(nn.Module):
    """ShuffleNet / CSP style: a conv on one half of the channels (``chunk``, a view with gaps) and a smooth
    activation of a slice of a concatenation (GhostNet style)."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)[:, :24]
        return self.fc(F.hardswish(y).mean((2, 3)))


def test_views_with_gaps_are_coded_and_rebuilt_with_their_strides():
    """A chunk of the channels (what ShuffleNet's and CSP's branches convolve) or a slice of them is a view with
    gaps: it is coded like any tensor and rebuilt with its strides (32 bits: the gradients of plain PyTorch), where
    it used to be kept in full -- its whole base storage with it; an expanded view (overlapping) is still kept."""
    from leanprop.ops.codec import _non_overlapping, _Packed

    base = torch.randn(4, 32, 8, 8)
    assert _non_overlapping(base.chunk(2, 1)[1]) and _non_overlapping(base[:, :24]) and _non_overlapping(base)
    assert not _non_overlapping(torch.randn(4, 1, 8, 8).expand(4, 3, 8, 8))
    view = base.chunk(2, 1)[1]
    packed = _Packed(view, 8)
    rebuilt = packed.unpack()
    assert rebuilt.shape == view.shape and rebuilt.stride() == view.stride()
    step = packed.step.max()
    assert float((rebuilt - view).abs().max()) <= float(step) * 0.5001
    torch.manual_seed(0)
    model = _ChunkNet()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    m, codec = _with_codec(model, 32)
    assert torch.equal(_grads(m, x, y), _grads(model, x, y))
    m4, codec4 = _with_codec(model, 4)
    kept = saved_bytes(m4, x)
    assert kept.by_kind.get("float", 0) < 0.1 * kept.total_bytes, kept.table()  # nothing of activation size as is
    assert F.cosine_similarity(_grads(m4, x, y), _grads(model, x, y), 0) > 0.98


@pytest.mark.parametrize("kernels", [None, "c"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_exact_zero_codes_keep_a_relu_outputs_zeros(kernels, stochastic):
    """What a compiled graph saves reaches the codec without its op, and a ReLU's backward may read its mask off it
    (result > 0): with ``exact_zero`` the rebuilt tensor is zero exactly where the original is; without, values
    below half a step round to zero (the codes eager uses, where masks are kept on their own). Only codes of 0 of
    positive values move, by one step, and a group without a zero keeps its codes."""
    from leanprop.ops.codec import _Packed
    from leanprop.ops.kernels import load_kernels

    kern = load_kernels(required=False) if kernels == "c" else None
    if kernels == "c" and kern is None:
        pytest.skip("no C compiler: the compiled kernels are not built")
    torch.manual_seed(0)
    t = F.relu(torch.randn(8, 4096)) * torch.rand(8, 1) * 10  # groups of range [0, max]: tiny positives exist
    t[0, :256] = torch.rand(256) + 1  # one group without a zero: nothing changes there

    def codes(exact):
        return _Packed(t, 2, torch.Generator().manual_seed(3) if stochastic else None, kern, exact_zero=exact)

    exact, plain = codes(True).unpack(), codes(False).unpack()
    assert torch.equal(exact > 0, t > 0) and torch.equal(exact == 0, t == 0)
    assert ((plain == 0) & (t > 0)).any()  # without it, some positives become zeros
    assert torch.equal(exact[0, :256], plain[0, :256])
    moved = exact != plain
    step = codes(True).step.expand(-1, 256).reshape(t.shape)
    assert bool((plain[moved] == 0).all() and (t[moved] > 0).all())
    torch.testing.assert_close(exact[moved], step[moved])


@pytest.mark.parametrize("bits,cosine", [(8, 0.999), (4, 0.98), (2, 0.80)])
def test_k_bit_codes_keep_less_with_gradients_close_to_exact(bits, cosine):
    torch.manual_seed(0)
    model = models.create("resnet20")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    m, _ = _with_codec(model, bits, stochastic=True)
    cos = F.cosine_similarity(_grads(m, x, y), _grads(model, x, y), 0)
    assert cos >= cosine, (bits, float(cos))
    dense = saved_bytes(model, x).total_bytes
    assert saved_bytes(m, x).total_bytes < {8: 0.30, 4: 0.17, 2: 0.10}[bits] * dense


def test_stochastic_rounding_is_unbiased_and_follows_seed_and_step():
    t = torch.full((1, 4096), 0.3)
    t[0, 0], t[0, 1] = 0.0, 1.0  # group range [0, 1]: 0.3 lies between codes at 2 bits (0, 1/3, 2/3, 1)
    codec = SavedTensorCodec(2, 0, stochastic=True, seed=3)
    mean = torch.stack([codec.unpack(codec.pack(t.clone())) for _ in range(20)]).mean()
    assert abs(float(mean) - float(t.mean())) < 2e-3  # unbiased (nearest would give 1/3 for every 0.3)
    a, b = SavedTensorCodec(2, 0, stochastic=True, seed=3), SavedTensorCodec(2, 0, stochastic=True, seed=3)
    a.step = b.step = 5
    assert torch.equal(a.unpack(a.pack(t)), b.unpack(b.pack(t)))  # same seed and step: the same codes


def test_blpa_policy_state_roundtrip_and_summary():
    model = models.create("resnet8")
    ctl = leanprop.convert_(model, BLPAConfig(bits=4, policy={"conv": 8}))
    for _ in range(3):
        ctl.step()
    assert ctl.state_dict()["rng"] == {"seed": 0, "step": 3}
    other = leanprop.convert_(models.create("resnet8"), BLPAConfig(bits=4, policy={"conv": 8}))
    other.load_state_dict(ctl.state_dict())
    assert other.codec.step == 3 and other.codec.policy == {"conv": 8}
    assert "4-bit codes (nearest rounding, conv 8)" in ctl.summary()
    assert BLPAConfig(bits=2).stochastic_rounding and not BLPAConfig(bits=4).stochastic_rounding
    with pytest.raises(ValueError, match="unknown op kind 'conv2d'"):
        BLPAConfig(policy={"conv2d": 4})


def test_a_policy_that_codes_some_kinds_loads_the_compiled_kernels():
    """codec_bits=32 with a coded kind (the BN codes only) still runs the compiled coders where they build; nothing
    coded needs none."""
    from leanprop.ops.kernels import load_kernels

    if load_kernels(required=False) is None:
        pytest.skip("no C compiler for the compiled kernels")
    units = leanprop.convert_(models.create("resnet8"), BLPAConfig(bits=4, codec_bits=32, policy={"batch_norm": 4}))
    assert units.kernels_path is not None and "compiled C" in units.summary()
    exact = leanprop.convert_(models.create("resnet8"), BLPAConfig(bits=4, codec_bits=32))
    assert exact.kernels_path is None


@pytest.mark.parametrize("name", sorted(USER_MODELS))
def test_blpa4_on_user_models_keeps_less_with_close_gradients(name):
    """Any model: the policy applies wherever fused units are not found (F.relu, shared ReLUs, SiLU, LayerNorm)."""
    torch.manual_seed(0)
    model = USER_MODELS[name]()
    x, y = example_batch(8)
    plain = copy.deepcopy(model)
    leanprop.convert_(model, BLPAConfig(bits=4))
    cos = F.cosine_similarity(_grads(model, x, y), _grads(plain, x, y), 0)
    assert cos >= 0.95, float(cos)
    ratio = saved_bytes(model, x).total_bytes / saved_bytes(plain, x).total_bytes
    assert ratio < 0.30, ratio


class _PostAct(nn.Module):
    """A post-activation residual block written with F.relu: conv-BN-relu-conv-BN, add, relu, twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(4))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        for i in (0, 2):
            y = F.relu(self.bns[i](self.convs[i](x)))
            x = F.relu(self.bns[i + 1](self.convs[i + 1](y)) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_virtual_units_rebuild_relu_of_bn_and_block_outputs_from_the_bn_codes():
    """Every ReLU(BN) and ReLU(BN + identity) output is rebuilt from BN codes: the convs keep nothing of their input."""
    torch.manual_seed(0)
    model = _PostAct()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    m, codec = _with_codec(model, 8)
    g, g0 = _grads(m, x, y), _grads(model, x, y)
    assert F.cosine_similarity(g, g0, 0) > 0.999
    assert codec.stats["derived"] == 4  # every conv input after the stem: ReLU(BN) and ReLU(BN + identity)
    assert codec.stats["coded"] == 5 + 1 + 1  # the five BN inputs (xhat codes), the stem's input image, fc's input
    kept, dense = saved_bytes(m, x), saved_bytes(model, x)
    # per activation: 8-bit BN codes and a 1-bit ReLU mask; dense keeps the BN input and the ReLU output (64 bits)
    assert kept.total_bytes < 0.18 * dense.total_bytes


def test_swat_with_blpa_never_keeps_more_than_blpa_on_user_models():
    for name in ("FunctionalReLUNet", "SharedReLUNet", "MobileNetStyle", "EfficientNetStyle"):
        torch.manual_seed(0)
        base = USER_MODELS[name]()
        x, _ = example_batch(8)
        kept = {}
        for label, cfg in (("blpa", BLPAConfig(bits=4)), ("both", [leanprop.SWATConfig(sparsity=0.9),
                                                                   BLPAConfig(bits=4)])):
            m = copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # models with BN: no "nothing fused" warning now
                leanprop.convert_(m, cfg)
            kept[label] = saved_bytes(m, x).total_bytes
        layers = sum(isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in base.modules())
        assert kept["both"] <= kept["blpa"] + 8 * layers, (name, kept)  # + SWAT's two thresholds per layer


def test_layer_norm_and_smooth_activations_are_rebuilt_from_codes():
    """LayerNorm -> linear -> GELU -> linear (a ConvNeXt MLP) and BN -> SiLU (in place) -> conv: the LN output, the
    GELU output and the SiLU output keep nothing; gradients stay close to exact."""
    torch.manual_seed(0)

    class _Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(inplace=True)
            self.ln, self.fc1, self.fc2, self.head = nn.LayerNorm(16), nn.Linear(16, 64), nn.Linear(64, 16), \
                nn.Linear(16, 10)

        def forward(self, x):
            x = self.act(self.bn(self.conv(x)))
            h = x.permute(0, 2, 3, 1)
            h = h + self.fc2(F.gelu(self.fc1(self.ln(h))))
            return self.head(h.mean((1, 2)))

    model = _Mlp()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    m, codec = _with_codec(model, 8)
    assert F.cosine_similarity(_grads(m, x, y), _grads(model, x, y), 0) > 0.999
    # SiLU's input (a BN output), the LN output (fc1's 2-D input view) and the GELU output (fc2's input): recipes
    assert codec.stats["derived"] >= 3, codec.stats
    kept, dense = saved_bytes(m, x), saved_bytes(model, x)
    assert kept.total_bytes < 0.25 * dense.total_bytes


def test_compiled_group_coder_matches_torch_ops_and_is_unbiased():
    from leanprop.ops.codec import _Packed
    from leanprop.ops.kernels import load_kernels

    kernels = load_kernels(required=False)
    if kernels is None:
        pytest.skip("no C compiler: the torch-op coder is the one in use")
    t = torch.randn(4, 8, 33, 7)  # not a multiple of the group: the last group is padded
    for bits in (2, 4, 8):
        c, ref = _Packed(t, bits, None, kernels).unpack(), _Packed(t, bits).unpack()
        step = (t.max() - t.min()) / ((1 << bits) - 1)
        assert c.shape == t.shape and (c - t).abs().max() <= step / 2 + 1e-6  # nearest, like the torch ops
        assert (c - ref).abs().max() <= step + 1e-6  # (ties round up here, to even there)
    flat = torch.full((64, 256), 0.3)
    flat[:, 0], flat[:, 1] = 0.0, 1.0
    g = torch.Generator().manual_seed(0)
    decoded = _Packed(flat, 2, g, kernels).unpack()[:, 2:]
    assert abs(float(decoded.mean()) - 0.3) < 2e-3  # stochastic rounding: unbiased
    again = _Packed(flat, 2, torch.Generator().manual_seed(0), kernels).unpack()[:, 2:]
    assert torch.equal(decoded, again)  # the draws follow the generator's seed


def test_compiled_bn_codes_rebuild_what_the_torch_path_rebuilds():
    """The affine group coder (BN input -> xhat codes, decoded into x, or ReLU(gamma * xhat + beta) with the mask)
    gives the gradients of the torch-op path up to the rounding of ties."""
    from leanprop.ops.kernels import load_kernels

    kernels = load_kernels(required=False)
    if kernels is None:
        pytest.skip("no C compiler: the torch-op coder is the one in use")
    torch.manual_seed(0)
    model = _PostAct()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    exact = _grads(model, x, y)
    m_c, c = _with_codec(model, 8, kernels=kernels)
    m_t, _ = _with_codec(model, 8)
    g_c, g_t = _grads(m_c, x, y), _grads(m_t, x, y)
    assert F.cosine_similarity(g_c, exact, 0) > 0.999 and F.cosine_similarity(g_c, g_t, 0) > 0.9999
    assert c.stats["derived"] == 4


class _CountingKernels:
    """The compiled kernels, counting the calls of each binding."""

    def __init__(self, kernels):
        self.kernels, self.calls = kernels, {}

    def __getattr__(self, name):
        f = getattr(self.kernels, name)

        def counted(*a, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            return f(*a, **kw)

        return counted if callable(f) else f


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_compiled_bn_codes_take_channels_last_and_bf16_autocast(amp):
    """Channels-last tensors, and the bf16 BN inputs of CPU autocast, go through the compiled coder too (codes and
    masks in memory order, decoded straight to the saved dtype), with the gradients of the torch-op path."""
    from leanprop.ops.kernels import load_kernels

    kernels = load_kernels(required=False)
    if kernels is None:
        pytest.skip("no C compiler: the torch-op coder is the one in use")
    torch.manual_seed(0)
    model = _PostAct().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))

    def grads(m):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = m(x)
        F.cross_entropy(out.float(), y).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    counting = _CountingKernels(kernels)
    m_c, c = _with_codec(model, 8, kernels=counting)
    m_t, _ = _with_codec(model, 8)
    g_c, g_t, exact = grads(m_c), grads(m_t), grads(model)
    assert counting.calls.get("group_encode_affine") == 5  # every BN input
    assert counting.calls.get("group_decode_affine", 0) >= 5
    assert c.stats["derived"] == 4
    assert F.cosine_similarity(g_c, g_t, 0) > (0.999 if amp else 0.9999)
    assert F.cosine_similarity(g_c, exact, 0) > (0.99 if amp else 0.999)


@pytest.mark.parametrize("channels", [16, 24])  # a group of 256 holds whole pixels / pixels split across groups
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affine_group_kernels_follow_the_memory_order(dtype, channels):
    """Codes of a channels-last tensor are the codes of its NHWC memory order with the channel innermost; the
    decode (with a mask in that order) gives back the same layout and dtype."""
    import numpy as np

    from leanprop.ops.kernels import load_kernels

    kernels = load_kernels(required=False)
    if kernels is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    x = torch.randn(4, channels, 8, 8).to(dtype)
    cl = x.contiguous(memory_format=torch.channels_last)
    shift, scale = torch.randn(channels), torch.rand(channels) + 0.5
    packed, lo, step = kernels.group_encode_affine(cl, shift, scale, 8, 256)
    v = (cl.float() - shift.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
    ref = kernels.group_encode(v.permute(0, 2, 3, 1).reshape(-1, 256).contiguous(), 8)
    assert torch.equal(packed, ref[0]) and torch.allclose(lo, ref[1]) and torch.allclose(step, ref[2])
    keep = torch.rand(x.shape) > 0.5
    mask = torch.from_numpy(np.packbits(keep.permute(0, 2, 3, 1).reshape(-1).numpy()))
    w, b = torch.rand(channels), torch.randn(channels)
    out = kernels.group_decode_affine(packed, lo, step, 8, 256, tuple(x.shape), w, b, mask, None, dtype, True)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    xhat = kernels.group_decode(packed, lo, step, 8, 256).view(4, 8, 8, channels).permute(0, 3, 1, 2)
    expect = (xhat * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)) * keep
    assert torch.allclose(out.float(), expect, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positive_bits_kernel_is_numpy_packbits_of_the_comparison(dtype):
    import numpy as np

    from leanprop.ops.kernels import load_kernels

    kernels = load_kernels(required=False)
    if kernels is None:
        pytest.skip("no C compiler")
    x = torch.randn(1003).to(dtype)  # a partial last byte
    x[::7] = 0.0
    x[5] = float("nan")  # NaN > 0 is false, as in torch
    assert torch.equal(kernels.positive_bits(x), torch.from_numpy(np.packbits((x > 0).numpy())))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_mask_expansion_equals_the_bool_path(dtype, channels_last):
    """A kept 1-bit mask rebuilt by the compiled expansion gives what the bool-tensor path gives (values,
    dtype and strides)."""
    from leanprop.ops.codec import _Mask
    from leanprop.ops.kernels import load_kernels

    kernels = load_kernels(required=False)
    if kernels is None:
        pytest.skip("no C compiler")
    t = torch.randn(3, 5, 7, 9).to(dtype)  # 945 elements: a partial last byte
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    fast, slow = _Mask(t > 0.2, t, 0.75, -2.0, kernels), _Mask(t > 0.2, t, 0.75, -2.0)
    a, b = fast.unpack(), slow.unpack()
    assert a.dtype == b.dtype == dtype and a.stride() == b.stride() == t.stride() and torch.equal(a, b)
    assert torch.equal(_Mask.positive(t, 1.0, 0.0, kernels).unpack(), (t > 0).to(dtype))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compiled_relu6_of_bn_output_matches_the_torch_path(channels_last):
    """ReLU6 of a BN output: both masks made in one compiled pass, and the clamp rebuilt from the BN codes in the
    decode pass, with the gradients of the torch-op path."""
    import numpy as np

    from leanprop.ops.kernels import load_kernels

    kernels = load_kernels(required=False)
    if kernels is None:
        pytest.skip("no C compiler")
    x = torch.randn(1003) * 4
    inside, above = kernels.range_bits(x, 0.0, 6.0, True)
    assert torch.equal(inside, torch.from_numpy(np.packbits(((x > 0) & (x < 6)).numpy())))
    assert torch.equal(above, torch.from_numpy(np.packbits((x >= 6).numpy())))
    torch.manual_seed(0)
    model = USER_MODELS["MobileNetStyle"]()
    x, y = example_batch(8)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    counting = _CountingKernels(kernels)
    m_c, c = _with_codec(model, 8, kernels=counting)
    m_t, _ = _with_codec(model, 8)
    g_c, g_t = _grads(m_c, x, y), _grads(m_t, x, y)
    assert counting.calls.get("range_bits", 0) >= 2 and c.stats["derived"] >= 2
    assert F.cosine_similarity(g_c, g_t, 0) > 0.9999


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_run_of_post_activation_blocks_is_rebuilt_in_one_pass_with_the_same_gradients(channels_last, monkeypatch):
    """A block's saved input ReLU(BN + identity), whose identity is the previous block's output and so on, is
    rebuilt by one compiled pass over the whole run (CKernels.group_decode_chain); its gradients equal, bit for
    bit, those of the level-by-level rebuild."""
    import copy

    from leanprop.ops import bn_units
    from leanprop.ops.kernels import load_kernels

    if load_kernels(required=False) is None:
        pytest.skip("no C compiler for the compiled kernels")
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    leanprop.convert_(model, BLPAConfig(bits=4))
    runs = []
    chain = bn_units.ReluOfBN._residual_chain

    def spied(self, bn, other):
        found = chain(self, bn, other)
        runs.append(len(found[0]) if found else 1)
        return found

    def grads(rebuild) -> list[torch.Tensor]:
        monkeypatch.setattr(bn_units.ReluOfBN, "_residual_chain", rebuild)
        m = copy.deepcopy(model)
        F.cross_entropy(m(x), y).backward()
        return [p.grad for p in m.parameters()]

    level_by_level = grads(lambda self, bn, other: [])
    in_one_pass = grads(spied)
    assert max(runs) == 3  # resnet20: three blocks a stage, the third one's input is a run of three
    assert all(torch.equal(a, b) for a, b in zip(level_by_level, in_one_pass, strict=True))
