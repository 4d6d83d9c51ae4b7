"""`python -m device_bridge`: the `tvdnet-bridge` command."""

import sys

from ._cli import main

sys.exit(main())
