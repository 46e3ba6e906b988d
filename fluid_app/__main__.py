"""``python -m fluid_app`` is the ``fluid`` command."""

import sys

from .cli import main

sys.exit(main())
