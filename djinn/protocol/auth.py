"""Authentication (DESIGN.md section 8, docs/SECURITY.md): CurveZMQ keys or the shared secret, checked in
the ZMTP handshake before any message is accepted (the server's ZAP handler is djinn/server/gate.py, Note
[Credentials before any message]), and the secret again at HELLO."""
from __future__ import annotations

import hmac
import ipaddress
import os
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


# -- CurveZMQ (docs/SECURITY.md) ----------------------------------------------------------------------
# Keys are zmq certificate files made by `djinn keys` (zmq.auth.create_certificates): NAME.key holds the
# public key, NAME.key_secret both keys. The server's ROUTER is a CURVE server whose ZAP handler admits
# only the client public keys found in `curve_allowed_dir`; a client's DEALER is a CURVE client that
# knows the server's public key. Handshake failures never deliver a message, so the client learns of
# them from its socket monitor (handshake_error) instead of waiting out its HELLO.

def curve_available() -> bool:
    import zmq

    return bool(zmq.has("curve"))


# The certificate reader and key checks import no zmq: ServerConfig.validate runs them in the supervisor
# process, which stays free of the worker's native libraries (server/supervisor.py).
_Z85 = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def read_cert(path: str) -> tuple[bytes | None, bytes | None]:
    """(public, secret) z85 keys of a zmq certificate file, as zmq.auth.load_certificate reads them."""
    public = secret = None
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line.startswith(b"public-key"):
                public = line.split(b"=", 1)[1].strip(b" \t'\"")
            elif line.startswith(b"secret-key"):
                secret = line.split(b"=", 1)[1].strip(b" \t'\"")
    return public, secret


def _is_z85_key(key) -> bool:
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    return isinstance(key, str) and len(key) == 40 and set(key) <= _Z85


def load_secret_cert(path: str, what: str) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a NAME.key_secret certificate; ValueError naming `what` if unusable."""
    p = os.path.expanduser(str(path))
    if not os.path.isfile(p):
        raise ValueError(f"{what}={path!r}: no such file (make one with `djinn keys DIR --name NAME`)")
    try:
        public, secret = read_cert(p)
    except OSError as e:
        raise ValueError(f"{what}={path!r}: cannot read it ({e})") from None
    if public is None:
        raise ValueError(f"{what}={path!r} is not a zmq certificate (no public-key line)")
    if not secret:
        raise ValueError(f"{what}={path!r} holds only a public key: pass the NAME.key_secret file")
    if not (_is_z85_key(public) and _is_z85_key(secret)):
        raise ValueError(f"{what}={path!r}: its keys are not valid CurveZMQ keys (40 z85 characters)")
    return public, secret


def load_public_key(value: str, what: str) -> bytes:
    """A z85 public key from a certificate file path, or the 40-character z85 key itself."""
    p = os.path.expanduser(str(value))
    if os.path.isfile(p):
        try:
            public, _ = read_cert(p)
        except OSError as e:
            raise ValueError(f"{what}={value!r}: cannot read it ({e})") from None
        if not _is_z85_key(public):
            raise ValueError(f"{what}={value!r} holds no valid CurveZMQ public key")
        return public
    if _is_z85_key(value):
        return value.encode("ascii")
    raise ValueError(f"{what}={value!r} is neither a certificate file nor a 40-character z85 public key")


def allowed_client_keys(allowed_dir: str) -> list[bytes]:
    """The client public keys a server admits: those of the *.key files in `allowed_dir` (as ZAP reads them)."""
    d = os.path.expanduser(str(allowed_dir))
    if not os.path.isdir(d):
        raise ValueError(f"curve_allowed_dir={allowed_dir!r} is not a directory")
    keys = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".key"):
            try:
                public, _ = read_cert(os.path.join(d, name))
            except OSError as e:
                raise ValueError(f"curve_allowed_dir={allowed_dir!r}: cannot read {name} ({e})") from None
            if not _is_z85_key(public):  # zmq's ZAP handler would then refuse every client
                raise ValueError(f"curve_allowed_dir={allowed_dir!r}: {name} holds no valid CurveZMQ public key")
            keys.append(public)
    return keys


def check_server_curve(secret_key: str | None, allowed_dir: str | None) -> bool:
    """Validate the server's Curve settings (both or neither); True when Curve is on."""
    if secret_key is None and allowed_dir is None:
        return False
    if not secret_key or not allowed_dir:
        raise ValueError("CurveZMQ needs both curve_secret_key (the server's .key_secret file) and "
                         "curve_allowed_dir (a directory of allowed clients' .key files)")
    load_secret_cert(secret_key, "curve_secret_key")
    if not allowed_client_keys(allowed_dir):
        raise ValueError(f"curve_allowed_dir={allowed_dir!r} holds no client public keys (*.key): make one "
                         "with `djinn keys DIR --name client-NAME` and copy its .key file there")
    return True


def check_client_curve(server_public_key: str | None, client_secret_key: str | None) -> tuple | None:
    """Validate a client's Curve settings (both or neither): None, or (server_public, public, secret)."""
    if server_public_key is None and client_secret_key is None:
        return None
    if not server_public_key or not client_secret_key:
        raise ValueError("CurveZMQ needs both server_public_key (the server's .key file or z85 key) and "
                         "client_secret_key (this client's .key_secret file)")
    if not curve_available():
        raise ValueError("server_public_key is set but this libzmq was built without CURVE support")
    server = load_public_key(server_public_key, "server_public_key")
    public, secret = load_secret_cert(client_secret_key, "client_secret_key")
    return server, public, secret


def apply_client_curve(sock, keys: tuple) -> None:
    """Make `sock` a CURVE client with keys from check_client_curve (before connect)."""
    import zmq

    server, public, secret = keys
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def apply_client_secret(sock, secret: str) -> None:
    """Present the shared secret in the handshake, as the PLAIN mechanism's password (before connect).
    The server's ZAP handler checks it before it accepts any message (server/gate.py)."""
    import zmq

    sock.setsockopt(zmq.PLAIN_USERNAME, b"djinn")
    sock.setsockopt(zmq.PLAIN_PASSWORD, check_secret_length(secret, "secret"))  # checked before, too


def check_secret_length(secret: str, what: str) -> bytes:
    """The secret as bytes; ValueError unless it is 1-255 bytes (what ZMTP's PLAIN mechanism carries)."""
    raw = secret.encode()
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"{what} is {len(raw)} bytes in UTF-8; a shared secret must be 1-255 bytes")
    return raw


def handshake_failed_events() -> int:
    import zmq

    return (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def handshake_error(event: int, value: int, address: str, mode: str) -> AuthError:
    """The error for a ZMTP handshake that failed before HELLO (a socket monitor event). `mode` is how
    this client authenticates: "curve" (keys, maybe a secret too), "secret" (PLAIN) or "none"."""
    import zmq

    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        if mode == "curve":
            return AuthError(f"the djinn server at {address} refused this client's CurveZMQ key (status {value}): "
                             "its public .key file is not in the server's curve_allowed_dir")
        return AuthError(f"the djinn server at {address} refused the handshake (status {value}): wrong or "
                         "missing secret (set DJINN_SECRET or pass secret= to djinn.connect)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if mode == "curve":
            return AuthError(f"the djinn server at {address} does not use CurveZMQ: connect without "
                             "server_public_key/client_secret_key, or start the server with curve keys")
        if mode == "secret":
            return AuthError(f"the djinn server at {address} does not take a shared secret alone: it uses none "
                             "(connect without secret=, unset DJINN_SECRET) or it requires CurveZMQ keys "
                             "(server_public_key=, client_secret_key=)")
        return AuthError(f"the djinn server at {address} requires a shared secret (secret= or DJINN_SECRET) or "
                         "CurveZMQ keys (server_public_key= the server's .key file, client_secret_key= this "
                         "client's .key_secret file)")
    if mode == "curve":
        return AuthError(f"the CurveZMQ handshake with {address} failed: server_public_key may not be this "
                         "server's key, or the server does not use CurveZMQ")
    return AuthError(f"the connection handshake with {address} failed: the server may require a shared secret "
                     "or CurveZMQ keys (server_public_key=, client_secret_key=)")
