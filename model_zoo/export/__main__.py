"""``python -m model_zoo.export``: see :mod:`model_zoo.export.cli`."""

import sys

from model_zoo.export.cli import main

sys.exit(main())
