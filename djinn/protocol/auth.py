"""Shared-secret authentication, checked once per connection at HELLO (DESIGN.md section 8)."""
from __future__ import annotations

import hmac
import ipaddress
import socket

from .errors import AuthError


def check_secret(expected: str | None, given: object) -> None:
    """Raise AuthError unless `given` matches `expected` (constant-time). No secret configured: open."""
    if expected is None:
        return
    if not isinstance(given, str) or not hmac.compare_digest(expected.encode(), given.encode()):
        raise AuthError("wrong or missing secret (set DJINN_SECRET or pass secret= to djinn.connect)")


def is_loopback(host: str) -> bool:
    """True when `host` (an address or name a server binds to) only accepts local connections."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    if host in ("*", "0.0.0.0", "::", ""):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False
