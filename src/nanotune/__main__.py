"""`python -m nanotune`: the same as the `nanotune` command."""

import sys

from nanotune.cli import main

sys.exit(main())
