"""``python -m astm.bench``."""

import sys

from . import main

sys.exit(main())
