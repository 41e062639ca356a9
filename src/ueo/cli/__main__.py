"""`python -m ueo.cli`: the `ueo` command."""

import sys

from ueo.cli import main

sys.exit(main())
