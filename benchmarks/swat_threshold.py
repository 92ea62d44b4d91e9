"""`leanprop bench swat_threshold` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.swat_threshold import main

raise SystemExit(main())
