"""leanprop.blpa."""
