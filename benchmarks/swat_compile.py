"""`leanprop bench swat_compile` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.swat_compile import main

raise SystemExit(main())
