"""`leanprop bench blpa_memory` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.blpa_memory import main

raise SystemExit(main())
