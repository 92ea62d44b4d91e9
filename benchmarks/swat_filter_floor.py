"""`leanprop bench swat_filter_floor` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.swat_filter_floor import main

raise SystemExit(main())
