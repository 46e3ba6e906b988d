"""The one exception type users see.

Every check on user input raises :class:`FluidError` with a single line that says what was
wrong *and how to fix it*. The CLI prints it and exits with status 2, the UI shows it in the
page; nothing deeper than this message should reach a user for bad input.
"""


class FluidError(ValueError):
    """A user-facing error whose message names the fix (one line, no traceback needed)."""
