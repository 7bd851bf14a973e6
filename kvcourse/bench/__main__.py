"""``python -m kvcourse.bench``: see ``kvcourse.bench.cli``."""

import sys

from .cli import main

sys.exit(main())
