"""leanprop.accounting."""
