"""BLPA configuration (Chakrabarti & Moseley, NeurIPS 2019; docs/methods/blpa.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

BITS = (2, 4, 8, 32)
MODES = ("signaware", "ref")
KERNELS = ("auto", "c", "torch")


@dataclass
class BLPAConfig:
    """How BLPA stores activations for the backward pass.

    bits: K, the code width of the stored BN output: 8 or 4 (the paper), 2 (beyond the paper), or 32 =
        lossless (fp32 normalised values + 1-bit ReLU mask; for checking gradients against PyTorch).
    mode: "signaware" (default; any sign of gamma, ReLU mask always exact) or "ref" (the reference
        formula bit for bit: Delta = 6/2^K, the 1e-6 offset, gamma clamped to >= 1e-8;
        docs/methods/blpa.md, 'Quantiser').
    window: R, the quantised range is +-R batch standard deviations ("ref" fixes R = 3).
    simulate: fake-quant mode for accuracy debugging: same gradients, but keeps the dequantised fp32
        values instead of packed codes (no memory saved). Never use it for benchmarks.
    codec: store what autograd keeps *outside* the fused units by the storage policy of
        :mod:`leanprop.ops.codec` (1-bit masks for ReLU-family ops and dropout, nothing for pooling inputs,
        ``bits``-bit codes for every other float tensor: conv/linear/BatchNorm/LayerNorm/activation inputs);
        False keeps them as they are (the BLPA paper's scope: units only).
    codec_bits: the code width outside the units when it should differ from ``bits`` (2, 4, 8, or 32 = kept as
        they are); None: ``bits``.
    policy: per op-kind code widths, e.g. ``{"conv": 8, "batch_norm": 4}`` (kinds: ``leanprop.ops.codec.OP_KINDS``
        and ``other``), over ``codec_bits``.
    stochastic: unbiased stochastic rounding of the codes outside the units (ActNN, Chen et al. 2021), drawn from
        the codec's own generator (seeded with ``seed``; its state goes into checkpoints); False: nearest; None
        (default): stochastic at 2 bits, where its lack of bias matters most, nearest above (one step's gradient is
        closer to exact with nearest rounding at 4 bits: cosine 0.971 against 0.941 on efficientnet_b0, batch 8).
    codec_min_bytes: tensors smaller than this are kept as they are by the codec.
    kernels: "auto" (compiled C kernels when a C compiler works, else torch ops), "c" or "torch".
    """

    bits: int = 4
    mode: str = "signaware"
    window: float = 3.0
    simulate: bool = False
    codec: bool = True
    codec_bits: int | None = None
    policy: dict[str, int] = field(default_factory=dict)
    stochastic: bool | None = None
    seed: int = 0
    codec_min_bytes: int = 65536
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"BLPA bits must be one of {BITS}, got {self.bits!r}")
        if self.mode not in MODES:
            raise ValueError(f"BLPA mode {self.mode!r}: use 'signaware' or 'ref'")
        if self.mode == "ref" and self.window != 3.0:
            raise ValueError("BLPA mode='ref' fixes window=3.0 (Delta = 6/2^K); use mode='signaware' to change it")
        if not self.window > 0:
            raise ValueError(f"BLPA window must be > 0 (standard deviations), got {self.window}")
        if self.codec_bits not in (None, 2, 4, 8, 32):
            raise ValueError(f"BLPA codec_bits must be 2, 4, 8, 32 or null (= bits), got {self.codec_bits!r}")
        from leanprop.ops.codec import OP_KINDS

        kinds = (*OP_KINDS, "other")
        for kind, b in self.policy.items():
            if kind not in kinds:
                raise ValueError(f"BLPA policy: unknown op kind {kind!r}; use one of {', '.join(kinds)}")
            if b not in (2, 4, 8, 32):
                raise ValueError(f"BLPA policy[{kind!r}]: bits must be 2, 4, 8 or 32, got {b!r}")
        if self.codec_min_bytes < 0:
            raise ValueError("BLPA codec_min_bytes must be >= 0")
        if self.kernels not in KERNELS:
            raise ValueError(f"BLPA kernels {self.kernels!r}: use one of {', '.join(KERNELS)}")

    @classmethod
    def preset(cls, name: str) -> BLPAConfig:
        """A named configuration: the code width, ``"8"``, ``"4"``, ``"2"`` or ``"32"`` (lossless check mode);
        the other settings keep their defaults."""
        try:
            bits = int(str(name).strip())
        except ValueError:
            bits = None
        if bits not in BITS:
            raise ValueError(f"unknown BLPA preset {name!r}: use the bits, one of {', '.join(map(str, BITS))}")
        return cls(bits=bits)

    @property
    def outside_bits(self) -> int | None:
        """The code width outside the fused units (None: the codec is off)."""
        if not self.codec:
            return None
        return self.bits if self.codec_bits is None else self.codec_bits

    @property
    def stochastic_rounding(self) -> bool:
        """Whether the codes outside the units round stochastically (``stochastic``; None: at 2 bits)."""
        if self.stochastic is not None:
            return self.stochastic
        bits = self.outside_bits
        return bits is not None and bits <= 2

    @property
    def levels(self) -> int:
        """n = 2^K code levels."""
        return 1 << self.bits

    @property
    def step(self) -> float:
        """Delta = 2R / 2^K in normalised units (6/2^K for the reference)."""
        return 2.0 * self.window / self.levels
