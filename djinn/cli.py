"""The `djinn` command (also `python -m djinn`).

    djinn keys DIR [--name server|client-NAME] [--force]
    djinn top [ADDRESS] [--once]

`top` is a live view of a server (djinn/frontend/top.py): its segments as bars and a row per session,
refreshed each second; ADDRESS defaults to $DJINN_SERVER, --once prints one frame.

makes a CurveZMQ keypair with zmq.auth.create_certificates: DIR/NAME.key (the public key, safe to copy
around) and DIR/NAME.key_secret (both keys, readable only by its owner). docs/SECURITY.md walks
through the set-up: the server gets its .key_secret (curve_secret_key) and a directory of the allowed
clients' .key files (curve_allowed_dir); each client gets its own .key_secret and the server's .key.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _keys(args: argparse.Namespace) -> int:
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        print("djinn keys: this libzmq was built without CURVE support", file=sys.stderr)
        return 1
    if not _NAME.match(args.name) or args.name.endswith((".key", ".key_secret")):
        print(f"djinn keys: --name {args.name!r} must be a plain file name such as server or client-alice "
              "(letters, digits, '.', '_', '-')", file=sys.stderr)
        return 2
    directory = os.path.expanduser(args.dir)
    public = os.path.join(directory, f"{args.name}.key")
    secret = public + "_secret"
    existing = [p for p in (public, secret) if os.path.exists(p)]
    if existing and not args.force:
        print(f"djinn keys: {' and '.join(existing)} already exist(s); a new key locks out everyone who has "
              "the old one. Pass --force to replace it, or pick another --name", file=sys.stderr)
        return 1
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        old_umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
        try:
            for p in existing:
                os.unlink(p)
            public, secret = zmq.auth.create_certificates(directory, args.name)
        finally:
            os.umask(old_umask)
        os.chmod(public, 0o644)
        os.chmod(secret, 0o600)
    except OSError as e:
        print(f"djinn keys: cannot write keys in {directory}: {e}", file=sys.stderr)
        return 1
    print(f"public key: {public}")
    print(f"secret key: {secret}  (keep it private)")
    if args.name.startswith("server"):
        print("server: --curve-secret-key " + secret + " --curve-allowed-dir DIR_OF_CLIENT_KEYS")
        print("clients: server_public_key=" + public + " (copy this .key file to each client)")
    else:
        print("server: copy " + public + " into the server's curve_allowed_dir, then restart the server")
        print("client: djinn.connect(ADDRESS, server_public_key=SERVER.key, client_secret_key=" + secret + ")")
    return 0


def _top(args: argparse.Namespace) -> int:
    from .config import env_secret, env_server_address

    address = args.address or env_server_address()
    if not address:
        print("djinn top: which server? pass its ADDRESS (host:port) or set DJINN_SERVER", file=sys.stderr)
        return 2
    from .frontend import top
    from .frontend.connection import Connection
    from .protocol.errors import DjinnError

    try:
        conn = Connection(address, env_secret(), server_public_key=args.server_public_key,
                          client_secret_key=args.client_secret_key)
    except DjinnError as e:
        print(f"djinn top: {e}", file=sys.stderr)
        return 1
    try:
        return top.run(conn, once=args.once)
    except KeyboardInterrupt:
        return 0
    finally:
        conn.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn", description="Djinn command line tools")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keys", help="make a CurveZMQ keypair (NAME.key public, NAME.key_secret secret)",
                       description="Make a CurveZMQ keypair for a Djinn server or client (docs/SECURITY.md).")
    k.add_argument("dir", metavar="DIR", help="directory to write the key files to (created if missing)")
    k.add_argument("--name", default="server",
                   help="file name of the pair: server (default) or client-NAME, giving NAME.key and NAME.key_secret")
    k.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    k.set_defaults(func=_keys)
    t = sub.add_parser("top", help="a live view of a server: segments as bars, a row per session",
                       description="A live view of a Djinn server, refreshed each second (Ctrl-C quits).")
    t.add_argument("address", metavar="ADDRESS", nargs="?", help="host:port or tcp://host:port (default $DJINN_SERVER)")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    t.add_argument("--server-public-key", help="the server's .key file, for a CurveZMQ server (docs/SECURITY.md)")
    t.add_argument("--client-secret-key", help="this client's .key_secret file, for a CurveZMQ server")
    t.set_defaults(func=_top)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
