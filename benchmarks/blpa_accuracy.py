"""`leanprop bench accuracy --suite blpa` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.accuracy_blpa import main

raise SystemExit(main())
