"""``python -m astm``: see :mod:`astm.cli`."""

import sys

from .cli import main

sys.exit(main())
