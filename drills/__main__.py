"""``python -m recserve.drills`` entry point."""

import sys

from recserve.drills.cli import main

sys.exit(main())
