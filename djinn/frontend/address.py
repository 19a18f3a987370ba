"""Server addresses: what a user may write, and a quick look before the HELLO.

`host:port` and `tcp://host:port` (IPv6 as `[::1]:port`) are accepted; a djinn server listens on TCP
only. Before the transport connects, the host name is resolved and a plain TCP connection is opened
and closed, both within `ClientConfig.connect_probe_s`: libzmq would retry a refused or unresolvable
address silently until the HELLO timed out (10 s) and could not say which of the two went wrong.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from ..protocol.errors import InvalidRequest, ServerUnavailable

_LOCAL_HINT = "or call djinn.connect() with no address (and no DJINN_SERVER) for a local embedded server"


@dataclass(frozen=True)
class Address:
    host: str
    """A name or an IP literal (IPv6 without its brackets)."""
    port: int

    @property
    def url(self) -> str:
        """The form libzmq connects to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse(text: str) -> Address:
    """`host:port` or `tcp://host:port`; anything else is refused with the form to use."""
    if not isinstance(text, str):
        raise InvalidRequest(f"a server address is a string such as 'localhost:5556', got {type(text).__name__}")
    s = text.strip()
    scheme, sep, rest = s.partition("://")
    if not sep:
        rest = s
    elif scheme != "tcp":
        raise InvalidRequest(f"server address {text!r}: a djinn server listens on TCP; write 'host:port' or "
                             "'tcp://host:port'")
    if rest.startswith("["):  # [v6]:port
        host, _, port = rest[1:].partition("]")
        port = port[1:] if port.startswith(":") else ""
    else:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or host == "*":
        raise InvalidRequest(f"server address {text!r} is not 'host:port' or 'tcp://host:port' (e.g. "
                             "'localhost:5556', 'tcp://10.0.0.5:5556'): the port is the one the server printed "
                             "in its 'djinn server ready at' line")
    return Address(host, int(port))


def check_reachable(addr: Address, timeout_s: float) -> None:
    """Resolve the host and open (then close) a TCP connection, all within timeout_s; raise
    ServerUnavailable saying what went wrong and what to do."""
    deadline = time.monotonic() + timeout_s
    infos = _resolve(addr, timeout_s)
    refused, errors = False, []
    for family, kind, proto, _, sockaddr in infos:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        sock.settimeout(left)
        try:
            sock.connect(sockaddr)
            return
        except ConnectionRefusedError:
            refused = True
        except socket.timeout:
            pass
        except OSError as e:
            errors.append(e.strerror or str(e))
        finally:
            sock.close()
    if refused:
        raise ServerUnavailable(
            f"nothing listens at {addr.url} (connection refused): check the address and port, and that the "
            f"server runs there (python -m djinn.server.server_main --port {addr.port} prints 'djinn server "
            f"ready at ...' when it listens; a remote client needs --bind 0.0.0.0), {_LOCAL_HINT}")
    why = f" ({'; '.join(errors)})" if errors else f" within {timeout_s:g}s"
    raise ServerUnavailable(
        f"no answer from {addr.url}{why}: the host is down or unreachable, or a firewall drops the "
        f"connection; check the address, {_LOCAL_HINT}")


def _resolve(addr: Address, timeout_s: float) -> list:
    # getaddrinfo has no timeout of its own and waits out an unreachable DNS resolver (5 s and more):
    # it runs in a daemon thread this call stops waiting for.
    box: list = []

    def work() -> None:
        try:
            box.append(socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM))
        except OSError as e:
            box.append(e)

    t = threading.Thread(target=work, name="djinn-resolve", daemon=True)
    t.start()
    t.join(timeout_s)
    if not box:
        raise ServerUnavailable(f"could not resolve the host name {addr.host!r} within {timeout_s:g}s (no answer "
                                f"from DNS): check the name, or give the server's IP address, {_LOCAL_HINT}")
    if isinstance(box[0], OSError):
        e = box[0]
        raise ServerUnavailable(f"cannot resolve the host name {addr.host!r} ({e.strerror or e}): check the "
                                f"name, or give the server's IP address, {_LOCAL_HINT}")
    return box[0]
