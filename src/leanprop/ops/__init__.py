"""What the methods share: bit packing, compiled CPU kernels and their build, the saved-tensor codec, sparse
storage and sparsification, autocast helpers, layers that keep less for backward (mask-ReLU, index max-pool),
and the interface a conv offers to another method's fused unit."""
