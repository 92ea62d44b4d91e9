"""SWAT: sparse weight activation training (Raihan & Aamodt, NeurIPS 2020)."""

from leanprop.swat.config import SWATConfig

__all__ = ["SWATConfig"]
