"""leanprop: memory- and compute-efficient back-propagation for PyTorch, with measured savings."""

__version__ = "0.1.0"
