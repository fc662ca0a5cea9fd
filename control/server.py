"""``python -m recserve.control.server``: the control-plane process (control/api/server.py), at its stable name.

The name stays because running control planes are found by it (``recctl``, the drills' session) and users start it
by it; the code lives in the api package.
"""

import sys

from recserve.control.api.server import main

if __name__ == "__main__":
    sys.exit(main())
