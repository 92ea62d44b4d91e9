"""leanprop.nn."""
