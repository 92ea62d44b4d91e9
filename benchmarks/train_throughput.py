"""`leanprop bench train_throughput` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.train_throughput import main

raise SystemExit(main())
