"""``python -m launchers``: the launcher service (see :mod:`launchers.service`)."""

import sys

from launchers.service import main

sys.exit(main())
