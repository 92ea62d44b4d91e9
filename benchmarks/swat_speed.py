"""`leanprop bench swat_speed` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.swat_speed import main

raise SystemExit(main())
