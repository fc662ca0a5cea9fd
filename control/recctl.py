"""``recctl`` / ``python -m recserve.control.recctl``: the operator's command line (control/api/recctl.py), at its
stable entry-point name."""

import sys

from recserve.control.api.recctl import main

if __name__ == "__main__":
    sys.exit(main())
