"""`leanprop bench blpa_speed` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.blpa_speed import main

raise SystemExit(main())
