"""`python -m fastkd.bench`: the same as the `fastkd-bench` command."""

import sys

from .cli import main

sys.exit(main())
