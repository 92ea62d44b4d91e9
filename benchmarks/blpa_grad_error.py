"""`leanprop bench blpa_grad_error` (run from the repository root; `--help` lists the options)."""
from leanprop.bench.blpa_grad_error import main

raise SystemExit(main())
