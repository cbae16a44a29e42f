"""`python -m worker`: the same as `run-worker`."""
from .cli import main

raise SystemExit(main())
