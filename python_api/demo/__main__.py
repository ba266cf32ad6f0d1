"""``python -m python_api.demo``: the same as the ``sam-demo`` command."""

import sys

from python_api.demo.cli import main

sys.exit(main())
