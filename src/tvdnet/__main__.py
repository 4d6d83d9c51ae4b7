"""`python -m tvdnet`: the `tvdnet` command."""

import sys

from ._cli import main

sys.exit(main())
