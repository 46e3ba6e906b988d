"""``python -m fluid_app`` is the ``fluid`` command."""

from .cli import run

run()
