"""``python -m fastbert.bench``: the same report as ``fastbert bench``."""

import sys

from .cli import main

sys.exit(main())
