"""``python -m moepatch.cli``: the ``moepatch`` command."""

import sys

from moepatch.cli import main

sys.exit(main())
