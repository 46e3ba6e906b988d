"""The one exception type users see.

Every check on user input raises :class:`FluidError` with a single line that says what was
wrong *and how to fix it*, in the library's own words: option names as the Python API
spells them (``k_min``, ``max_new_tokens``), never a command-line flag or a UI label. The
option(s) at fault travel in :attr:`FluidError.params`, so each interface phrases the error
for its own users: the CLI names the flags (``--k-min``) and exits with status 2, the demo
names its controls, a server fills the ``param`` field of its JSON error. Nothing deeper than
this message should reach a user for bad input.
"""

from __future__ import annotations


class FluidError(ValueError):
    """A user-facing error whose message names the fix (one line, no traceback needed)."""

    def __init__(self, message: str, *params: str):
        super().__init__(message)
        self.params: tuple[str, ...] = params

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


def phrase(error: FluidError, names: dict[str, str] | None = None) -> str:
    """The error's message followed by how one interface names the options at fault.

    ``names`` maps an API option name to the interface's name for it; an option missing
    from it is shown as a command-line flag (``k_min`` -> ``--k-min``).
    """
    if not error.params:
        return error.message
    shown = [(names or {}).get(p) or "--" + p.replace("_", "-") for p in error.params]
    return f"{error.message} ({', '.join(dict.fromkeys(shown))})"


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception, to quote inside a one-line error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def damaged(path: object, exc: BaseException, fix: str = "re-download or re-export the checkpoint") -> FluidError:
    """The error for a weights file that cannot be read (truncated, empty, not safetensors)."""
    return FluidError(f"{path} is damaged or incomplete ({first_line(exc)}); {fix}")


def not_utf8(path: object, line: int, exc: UnicodeDecodeError, param: str) -> FluidError:
    """The one-line error for a text file that is not UTF-8, naming its first bad line and byte."""
    byte = exc.object[exc.start:exc.start + 1].hex()
    return FluidError(f"{path} is not UTF-8 text (line {line} has the byte 0x{byte}); save it as UTF-8", param)
