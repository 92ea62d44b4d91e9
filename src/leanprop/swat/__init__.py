"""leanprop.swat."""
