"""``python -m tunnel``: the same as the ``tunnel`` command."""

import sys

from .cli import main

sys.exit(main())
