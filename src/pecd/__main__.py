"""``python -m pecd``."""

import sys

from pecd.cli import main

sys.exit(main())
