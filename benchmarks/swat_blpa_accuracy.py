"""`leanprop bench accuracy --suite swat_blpa` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.accuracy_swat_blpa import main

raise SystemExit(main())
