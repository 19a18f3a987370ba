"""ServerConfig / ClientConfig validation, YAML loading and loopback detection."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from djinn.config import DEFAULT_ARCHITECTURES, ClientConfig, ServerConfig, env_secret, env_server_address, load_yaml
from djinn.protocol.auth import check_secret, is_loopback
from djinn.protocol.errors import AuthError
from djinn.protocol.messages import Limits

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate():
    cfg = ServerConfig()
    assert cfg.validate() is cfg
    assert (cfg.bind, cfg.port, cfg.secret, cfg.device) == ("127.0.0.1", 5556, None, None)
    assert cfg.architectures == DEFAULT_ARCHITECTURES and cfg.architectures is not DEFAULT_ARCHITECTURES
    assert ServerConfig().architectures is not cfg.architectures


def test_limits_follow_config():
    cfg = ServerConfig(max_frames=10, max_frame_bytes=100, max_header_bytes=50, max_message_bytes=1000)
    assert cfg.limits() == Limits(max_frames=10, max_frame_bytes=100, max_header_bytes=50, max_total_bytes=1000,
                                  inline_bytes=4096)
    assert ServerConfig().limits() == Limits()


@pytest.mark.parametrize("bind", ["0.0.0.0", "*", "::", "", "10.0.0.1", "192.168.1.5"])
def test_non_loopback_bind_needs_secret(bind):
    with pytest.raises(ValueError) as info:
        ServerConfig(bind=bind).validate()
    msg = str(info.value)
    assert msg == (f"bind={bind!r} is not loopback: set a secret (--secret or DJINN_SECRET) and/or CurveZMQ keys "
                   "(--curve-secret-key and --curve-allowed-dir, see docs/SECURITY.md) or bind to 127.0.0.1")
    assert ServerConfig(bind=bind, secret="s3cret").validate().secret == "s3cret"


def test_empty_secret_counts_as_none():
    with pytest.raises(ValueError, match="set a secret"):
        ServerConfig(bind="0.0.0.0", secret="").validate()


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_bind_needs_no_secret(bind):
    assert ServerConfig(bind=bind).validate().bind == bind


@pytest.mark.parametrize("port", [-1, 65536, 100_000])
def test_bad_port(port):
    with pytest.raises(ValueError, match=rf"^port {port} is not a TCP port; use 0-65535 \(0 picks a free one\)$"):
        ServerConfig(port=port).validate()


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_good_ports(port):
    assert ServerConfig(port=port).validate().port == port


@pytest.mark.parametrize("name", ["heartbeat_s", "client_timeout_s", "session_idle_timeout_s"])
@pytest.mark.parametrize("value", [0, -1.0])
def test_timeouts_must_be_positive(name, value):
    with pytest.raises(ValueError, match=rf"^{name}={value} must be > 0 seconds$"):
        ServerConfig(**{name: value}).validate()


def test_client_timeout_at_least_twice_heartbeat():
    with pytest.raises(ValueError, match=r"^client_timeout_s=1.9 must be at least twice heartbeat_s=1.0$"):
        ServerConfig(heartbeat_s=1.0, client_timeout_s=1.9).validate()
    assert ServerConfig(heartbeat_s=1.0, client_timeout_s=2.0).validate().client_timeout_s == 2.0


def test_frame_limit_within_message_limit():
    with pytest.raises(ValueError, match=r"^max_frame_bytes must not exceed max_message_bytes$"):
        ServerConfig(max_frame_bytes=101, max_message_bytes=100).validate()
    ServerConfig(max_frame_bytes=100, max_message_bytes=100).validate()


# ---- YAML -----------------------------------------------------------------------------------------


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "server.yaml"
    p.write_text(text)
    return p


def test_shipped_config_matches_defaults():
    cfg = load_yaml(ServerConfig, REPO / "configs" / "server.yaml").validate()
    assert cfg == ServerConfig()


def test_load_yaml_values(tmp_path):
    p = write(tmp_path, "bind: 0.0.0.0\nsecret: abc\nport: 6000\nheartbeat_s: 0.25\nmodel_roots: [/models]\n")
    cfg = load_yaml(ServerConfig, p).validate()
    assert (cfg.bind, cfg.secret, cfg.port, cfg.heartbeat_s, cfg.model_roots) == (
        "0.0.0.0", "abc", 6000, 0.25, ["/models"])
    assert cfg.client_timeout_s == 10.0


def test_load_yaml_unknown_keys_named(tmp_path):
    p = write(tmp_path, "port: 1\nprot: 2\nbind_adress: x\n")
    with pytest.raises(ValueError) as info:
        load_yaml(ServerConfig, p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: unknown settings ['bind_adress', 'prot']; known: [")
    for f in dataclasses.fields(ServerConfig):
        assert repr(f.name) in msg


def test_load_yaml_unknown_non_string_keys_named(tmp_path):
    p = write(tmp_path, "port: 1\n1: x\nfoo: y\n")
    with pytest.raises(ValueError, match=r"unknown settings \[1, 'foo'\]"):
        load_yaml(ServerConfig, p)


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("5\n", "int")])
def test_load_yaml_not_a_map(tmp_path, text, kind):
    p = write(tmp_path, text)
    with pytest.raises(ValueError, match=rf"expected a map of settings, got {kind}$"):
        load_yaml(ServerConfig, p)


def test_load_yaml_empty_file_is_defaults(tmp_path):
    assert load_yaml(ServerConfig, write(tmp_path, "")) == ServerConfig()
    assert load_yaml(ServerConfig, write(tmp_path, "# nothing\n")) == ServerConfig()


def test_overrides_apply_and_none_means_keep(tmp_path):
    p = write(tmp_path, "port: 6000\nbind: 127.0.0.1\nlog_level: DEBUG\n")
    cfg = load_yaml(ServerConfig, p, port=7000, bind=None, secret="x", log_level=None)
    assert (cfg.port, cfg.bind, cfg.secret, cfg.log_level) == (7000, "127.0.0.1", "x", "DEBUG")
    assert load_yaml(ServerConfig, None, port=0) == ServerConfig(port=0)
    assert load_yaml(ServerConfig, None) == ServerConfig()


def test_override_does_not_skip_validation(tmp_path):
    cfg = load_yaml(ServerConfig, write(tmp_path, "port: 6000\n"), bind="0.0.0.0")
    with pytest.raises(ValueError, match="set a secret"):
        cfg.validate()


def test_client_config_from_yaml(tmp_path):
    p = write(tmp_path, "call_timeout_s: 5\nretries: 0\n")
    cfg = load_yaml(ClientConfig, p)
    assert (cfg.call_timeout_s, cfg.retries, cfg.upload_window) == (5, 0, 4)
    with pytest.raises(ValueError, match=r"unknown settings \['port'\]"):
        load_yaml(ClientConfig, write(tmp_path, "port: 1\n"))


def test_env_knobs(monkeypatch):
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    monkeypatch.setenv("DJINN_SECRET", "")
    assert env_server_address() is None and env_secret() is None
    monkeypatch.setenv("DJINN_SERVER", "tcp://h:1")
    monkeypatch.setenv("DJINN_SECRET", "abc")
    assert env_server_address() == "tcp://h:1" and env_secret() == "abc"


# ---- auth helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1", True), ("::1", True), ("localhost", True), ("127.1.2.3", True),
    ("0.0.0.0", False), ("10.0.0.1", False), ("*", False), ("::", False), ("", False), ("192.168.0.1", False),
    ("8.8.8.8", False), ("fe80::1", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_check_secret():
    check_secret(None, None)
    check_secret(None, "anything")
    check_secret("s", "s")
    for given in (None, "", "S", "s ", 5, b"s"):
        with pytest.raises(AuthError, match=r"^wrong or missing secret \(set DJINN_SECRET"):
            check_secret("s", given)


def test_fast_decode_capture_values():
    assert ServerConfig(fast_decode_capture="all").validate().fast_decode_capture == "all"
    with pytest.raises(ValueError, match="fast_decode_capture='eager' must be lazy or all"):
        ServerConfig(fast_decode_capture="eager").validate()


def test_run_fork_from_kv_values():
    assert ServerConfig().run_fork_from_kv is None  # None: from the KV on the CPU, re-executed on CUDA
    assert ServerConfig(run_fork_from_kv=False).validate().run_fork_from_kv is False
    with pytest.raises(ValueError, match="run_fork_from_kv='yes' must be true, false or null"):
        ServerConfig(run_fork_from_kv="yes").validate()


def test_wire_frames_and_connection_limits_are_validated():
    cfg = ServerConfig().validate()
    assert (cfg.wire_frame_bytes, cfg.max_connections, cfg.send_queue_messages) == (1 << 20, 256, 1000)
    assert cfg.limits().wire_frame_bytes == 1 << 20
    with pytest.raises(ValueError, match=r"^wire_frame_bytes=1024 must be an int >= 4096"):
        ServerConfig(wire_frame_bytes=1024).validate()
    with pytest.raises(ValueError, match=r"raise max_frames to at least 32770$"):
        ServerConfig(wire_frame_bytes=1 << 16).validate()
    ServerConfig(wire_frame_bytes=1 << 16, max_frames=32770).validate()
    for name in ("max_connections", "send_queue_messages"):
        with pytest.raises(ValueError, match=rf"^{name}=0 must be an int >= 1$"):
            ServerConfig(**{name: 0}).validate()
    with pytest.raises(ValueError, match=r"^handshake_timeout_s=0 must be > 0 seconds$"):
        ServerConfig(handshake_timeout_s=0).validate()


def test_a_secret_must_fit_the_handshake():
    """The secret is the ZMTP PLAIN password (djinn/server/gate.py), which carries at most 255 bytes."""
    ServerConfig(secret="s" * 255).validate()
    with pytest.raises(ValueError, match=r"^secret is 256 bytes in UTF-8; a shared secret must be 1-255 bytes$"):
        ServerConfig(secret="s" * 256).validate()
    ServerConfig(secret="é" * 127).validate()  # 254 bytes
    with pytest.raises(ValueError, match="^secret is 256 bytes in UTF-8"):
        ServerConfig(secret="é" * 128).validate()


def test_compile_and_memory_history_flags_reach_the_config():
    from djinn.server.server_main import parse_args

    args = parse_args(["--fast-decode-compile", "--memory-history"])
    assert args.fast_decode_compile is True and args.memory_history is True
    none = parse_args([])
    assert none.fast_decode_compile is None and none.memory_history is None  # None: keep the config's
    assert ServerConfig().fast_decode_compile is False and ServerConfig().memory_history is False
