"""Tier 1: `import djinn` and the server's supervisor load no torch, zmq or transformers (djinn/__init__.py,
Note [Lazy package]; server/supervisor.py must stay up when the worker's native libraries are what broke),
and every public name still resolves."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "zmq", "transformers")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [m for m in r.stdout.strip().split(",") if m]


def test_supervisor_and_cli_parse_load_no_native_libraries():
    assert _loaded_after("import djinn.server.server_main, djinn.server.supervisor, djinn.config") == []


def test_import_djinn_is_light_and_public_names_resolve_on_use():
    assert _loaded_after("import djinn; djinn.__version__") == []
    import djinn
    from djinn import Breakpoint, connect  # noqa: F401  (module __getattr__ serves from-imports too)

    for name in djinn.__all__:
        assert getattr(djinn, name) is not None, name
    assert set(djinn.__all__) <= set(dir(djinn))
    try:
        djinn.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
