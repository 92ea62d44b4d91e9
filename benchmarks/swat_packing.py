"""`leanprop bench swat_packing` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.swat_packing import main

raise SystemExit(main())
