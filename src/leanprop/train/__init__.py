"""leanprop.train."""
