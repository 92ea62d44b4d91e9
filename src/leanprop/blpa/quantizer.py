"""BLPA's per-channel K-bit quantiser of the BN output (Chakrabarti & Moseley 2019, Eq. 9; docs/methods/blpa.md,
'Quantiser'), in torch ops.

Everything is expressed through per-channel coefficients computed once per unit and step
(:func:`channel_coefficients`), so the encode and decode passes are one affine map, a floor and a clamp
per element; the compiled kernels (:mod:`leanprop.ops.kernels`) use the same coefficients.

Encode (``signaware``, the default): with ``sg = sign(gamma)`` (+1 for gamma = 0), ``g = |gamma|``,
``b = beta/g`` (0 where gamma = 0), ``Delta = 2R/2^K`` and ``s = clamp(2^K/2 - floor(b/Delta), 1, 2^K-1)``,
the code of an element is ``q = clamp(floor(a/Delta) + s, 0, 2^K-1)`` with ``a = sg*xhat + b = y/|gamma|``,
computed from the BN input as ``a/Delta = x*alpha + offset``.  The edge between codes ``s-1`` and ``s`` is
the zero of ``y``; to keep the ReLU mask exact whatever the rounding, codes are then forced to the side
given by the exact ``y > 0``.  Decode: ``xhat~ = sg*((q + 1/2 - s)*Delta - b)`` (bin midpoint),
``m = [q >= s]`` (``[beta > 0]`` where gamma = 0), ``z~ = m*(gamma*xhat~ + beta)``.

Encode (``ref``): the reference formula bit for bit: ``gammā = max(1e-8, gamma)``, ``b = beta/gammā``,
``Delta = 6/2^K``, ``s = max(1, 2^K/2 - floor(b/Delta))``, ``q = clip(floor((xhat + b - 1e-6)/Delta) + s, 0,
2^K-1)``; decode ``xhat~ = (q + 1/2 - s)*Delta - b``, ``m = [q >= s]``, ``z~ = ReLU(gammā*(q + 1/2 - s)*Delta)``.

Both decodes are affine in ``q``: ``xhat~ = q*A + B`` and ``z~ = m*(q*A2 + B2)``, ``m = [q >= t]``.
"""

from __future__ import annotations

import torch

from leanprop.blpa.config import BLPAConfig

__all__ = ["COEF", "channel_coefficients", "encode", "decode_xhat", "decode_mask", "decode_z", "view_c"]

# Columns of the per-channel coefficient table (C, len(COEF)), fp32.
COEF = ("alpha", "offset", "s", "b", "A", "B", "A2", "B2", "t", "K", "gamma", "beta")
_I = {name: i for i, name in enumerate(COEF)}


def view_c(v: torch.Tensor, dim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an (N, C, ...) tensor of ``dim`` dims."""
    return v.view((1, -1) + (1,) * (dim - 2))


def channel_coefficients(mean: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor | None,
                         beta: torch.Tensor | None, cfg: BLPAConfig) -> torch.Tensor:
    """The (C, 12) table of encode/decode coefficients (see the module docstring); fp32 (fp64 for fp64 BN)."""
    dt = torch.float64 if mean.dtype == torch.float64 else torch.float32
    mean, invstd = mean.to(dt), invstd.to(dt)
    gamma = torch.ones_like(mean) if gamma is None else gamma.detach().to(dt)
    beta = torch.zeros_like(mean) if beta is None else beta.detach().to(dt)
    n = float(cfg.levels)
    delta = cfg.step
    if cfg.mode == "ref":
        gbar = gamma.clamp_min(1e-8)
        b = beta / gbar
        s = torch.clamp_min(n / 2 - torch.floor(b / delta), 1.0)
        alpha = torch.full_like(mean, float("nan"))  # ref encodes from xhat, see encode()
        offset = torch.full_like(mean, float("nan"))
        A = torch.full_like(mean, delta)
        B = (0.5 - s) * delta - b
        A2 = gbar * delta
        B2 = gbar * (0.5 - s) * delta
        t = s
        K = gbar * invstd
    else:
        zero = gamma == 0
        sg = torch.where(gamma < 0, -1.0, 1.0)
        g = gamma.abs()
        b = torch.where(zero, torch.zeros_like(beta), beta / torch.where(zero, torch.ones_like(g), g))
        s = torch.clamp(n / 2 - torch.floor(b / delta), 1.0, n - 1)
        alpha = sg * invstd / delta
        offset = (b - sg * mean * invstd) / delta
        A = sg * delta
        B = sg * ((0.5 - s) * delta - b)
        A2 = gamma * A
        B2 = gamma * B + beta
        t = torch.where(zero, torch.where(beta > 0, 0.0, n), s)
        K = gamma * invstd
    return torch.stack([alpha, offset, s, b, A, B, A2, B2, t, K, gamma, beta], dim=1).contiguous()


def _col(coef: torch.Tensor, name: str, dim: int) -> torch.Tensor:
    return view_c(coef[:, _I[name]], dim)


def encode(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, coef: torch.Tensor,
           cfg: BLPAConfig) -> torch.Tensor:
    """uint8 codes of the BN output (same shape and memory format as ``x``); ``y`` is the exact BN output."""
    d = x.dim()
    n = cfg.levels
    if cfg.mode == "ref":
        xhat = (x.float() - view_c(mean.float(), d)) * view_c(invstd.float(), d)
        # b = -B - (0.5 - s)*Delta recovers beta/gammā exactly as stored in the table
        s = _col(coef, "s", d)
        a = xhat + _col(coef, "b", d)
        q = torch.floor((a - 1e-6) / cfg.step) + s
        return q.clamp_(0, n - 1).to(torch.uint8)
    u = x.float() * _col(coef, "alpha", d)
    u += _col(coef, "offset", d)
    q = u.floor_()
    q += _col(coef, "s", d)
    q.clamp_(0, n - 1)
    s = _col(coef, "s", d)
    t = _col(coef, "t", d)
    pos = y > 0
    forced = torch.where(pos, torch.maximum(q, s), torch.minimum(q, s - 1))
    # channels with gamma == 0 have a constant mask (t in {0, n}); their codes carry xhat only
    q = torch.where((t == s), forced, q)
    return q.to(torch.uint8)


def decode_xhat(q: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Approximate normalised BN input ``xhat~ = q*A + B`` (fp32)."""
    d = q.dim()
    return q.float() * _col(coef, "A", d) + _col(coef, "B", d)


def decode_mask(q: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Exact ReLU mask ``m = [q >= t]`` (bool)."""
    return q.float() >= _col(coef, "t", q.dim())


def decode_z(q: torch.Tensor, coef: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Approximate ReLU output ``z~ = m*(q*A2 + B2)`` in ``dtype``."""
    d = q.dim()
    qf = q.float()
    z = qf * _col(coef, "A2", d) + _col(coef, "B2", d)
    return z.mul_(qf >= _col(coef, "t", d)).to(dtype)
