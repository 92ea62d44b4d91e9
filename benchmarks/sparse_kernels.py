"""`leanprop bench kernels` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.kernels import main

raise SystemExit(main())
