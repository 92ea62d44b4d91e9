"""`leanprop bench accuracy --suite swat` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.accuracy_swat import main

raise SystemExit(main())
