"""Who can reach a server this package starts: the one loopback test, and the demo's rule
for a free-text model box. Kept apart from Gradio so that the CLI checks these flags before
importing the page or loading a model."""

from __future__ import annotations

import ipaddress

from .errors import FluidError


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (names other than localhost are
    not looked up: a name that resolves elsewhere would not be)."""
    host = (host or "").strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, share: bool, allow_any_model: bool) -> None:
    """Refuse a free-text model choice on a page others can reach: it would let any visitor
    load (and so probe) any path the server can read."""
    if not allow_any_model:
        return
    why = ("a free-text model choice lets every visitor load any file this machine can read; serve it on "
           "127.0.0.1 without a share link, or list the models to serve instead")
    if share:
        raise FluidError(why, "allow_any_model", "share")
    if not is_loopback(host):
        raise FluidError(why, "allow_any_model", "host")
