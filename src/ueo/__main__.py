"""`python -m ueo`, and `torchrun ... -m ueo`: the `ueo` command."""

import sys

from ueo.cli import main

sys.exit(main())
