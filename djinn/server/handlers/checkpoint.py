"""Session checkpoints: sessions that asked are written to host memory when the server shuts down.

A client marks a session (`conn.session(name, checkpoint=True)` or `s.checkpoint_on_shutdown()`) and
gets a token back. When the server stops gracefully (SIGTERM/SIGINT, after the drain), each marked
session's KV caches, token ids and tensors are written to `checkpoint_dir` (default
/dev/shm/djinn-checkpoints: host memory) as one safetensors file named by a hash of the token. After a
restart, `conn.restore_session(token)` opens a new session holding that state; the file is removed once
restored.

Note [Checkpoint tokens]
    The token is 256 random bits (secrets.token_urlsafe) handed only to the session's client, and it is
    the whole capability: whoever has it may restore the session, from any connection (a client process
    that restarted too keeps working if it kept the token). So nothing on disk shows it: a checkpoint's
    file is named by sha256(token), which a directory listing cannot turn back into a token.
    The directory is one this server's user owns and only it may enter (0700): the server creates it,
    or takes an existing one only after checking (a real directory, not a link, of its own user; a
    looser mode is tightened to 0700), and refuses one of another user, who could read or plant files.
    A file is created 0600 by os.open before the first byte is written (no window where it is looser),
    under a temporary name, and renamed into place whole. safetensors holds tensors and a string map
    only: nothing in a checkpoint is ever unpickled or executed.

Note [What a checkpoint holds]
    The session's name, and per model id its token ids and KV cache tensors (wherever they were: on
    the device, or swapped to the host pool), and its tensor handles. Not its runs (a paused breakpoint
    lives on a thread) and not the models: after a restart the client remotes its model again (the
    same weights give the same model id) and the restored KV continues where it was. The KV is stored
    per layer as [batch, kv_heads, tokens, head_dim] keys and values (independent of the block size);
    a restored session keeps it in host memory (`Session.restored_kv`) until its first call with the
    model, which writes it into blocks of the model's pool (`install_restored`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from pathlib import Path

import torch

from ...protocol.errors import InvalidRequest, SessionNotFound, short
from ...protocol.tensors import dtype_name
from ...vmu.data import aligned
from .. import quotas
from .registry import op

log = logging.getLogger("djinn.checkpoint")

FORMAT = "djinn-session-checkpoint/1"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
_KV_KEY = re.compile(r"^kv/([0-9a-zA-Z_:.-]{1,200})/(\d{1,6})/([a-z_]{1,40})$")


def directory(cfg) -> Path:
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir).expanduser()
    shm = Path("/dev/shm")
    return (shm if shm.is_dir() else Path(tempfile.gettempdir())) / "djinn-checkpoints"


def new_token() -> str:
    return secrets.token_urlsafe(32)  # Note [Checkpoint tokens]


def file_name(token: str) -> str:
    """The checkpoint file of `token`: its hash, so a directory listing shows no token."""
    return hashlib.sha256(token.encode()).hexdigest() + ".safetensors"


def checked_directory(cfg) -> Path:
    """The checkpoint directory, created 0700 if missing, else checked (Note [Checkpoint tokens]).
    InvalidRequest, naming the directory and the fix, when it cannot be used."""
    d = directory(cfg)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
    except OSError as e:
        raise InvalidRequest(f"this server cannot checkpoint: checkpoint_dir {d}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidRequest(f"this server cannot checkpoint: checkpoint_dir {d} is not a directory "
                             "(a symlink or a file); remove it or set another checkpoint_dir")
    if st.st_uid != os.geteuid():
        raise InvalidRequest(f"this server cannot checkpoint: checkpoint_dir {d} belongs to uid {st.st_uid}, "
                             f"not to this server's ({os.geteuid()}); remove it or set another checkpoint_dir")
    if stat.S_IMODE(st.st_mode) != 0o700:  # ours, but others may enter it (or the umask took too much)
        log.warning("checkpoint_dir %s had mode %o: set to 0700", d, stat.S_IMODE(st.st_mode))
        os.chmod(d, 0o700)
    return d


def arm(engine, s) -> str:
    """Mark session `s` to be checkpointed at shutdown; its token (the same one if asked twice)."""
    checked_directory(engine.cfg)  # refuse now, not at shutdown, if it cannot be written
    if s.checkpoint_token is None:
        s.checkpoint_token = new_token()
    return s.checkpoint_token


# -- ops -----------------------------------------------------------------------------------------------
@op
def set_checkpoint(engine, client_id, rid, args):
    """{sid, on}: write this session to host memory if the server shuts down; returns its token."""
    s = engine.session(client_id, args)
    on = args.get("on", True)
    if not isinstance(on, bool):
        raise InvalidRequest(f"on must be true or false, got {short(on)}")
    if on:
        arm(engine, s)
    else:
        s.checkpoint_token = None
    return {"token": s.checkpoint_token}


@op
def restore_session(engine, client_id, rid, args):
    """{token, name?}: a new session holding a checkpoint's state (Note [What a checkpoint holds])."""
    token = args.get("token")
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise InvalidRequest("restore_session needs the 43-character token that checkpointing returned")
    path = checked_directory(engine.cfg) / file_name(token)
    if not _own_file(path):
        raise SessionNotFound(f"no checkpoint {token[:8]}... on this server (restored already, or never written)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise InvalidRequest(f"checkpoint {token[:8]}... is not a {FORMAT} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = args.get("name", meta.get("name") or None)
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise InvalidRequest("session name must be a string of at most 200 characters")
    principal = engine.principal(client_id)
    nbytes = sum(aligned(t.numel() * t.element_size()) for k, t in tensors.items() if k.startswith("t/"))
    # Note [Principal GPU quota]: its tensors go to the device now (its KV at its first generate, checked there).
    quotas.check_principal(engine, principal, nbytes, "restore_session", f"{nbytes} bytes of restored tensors")
    s = engine.sessions.open(client_id, name, principal, sid=engine.meta.get("new_sid"))
    try:
        _install(engine, s, tensors)
    except BaseException:
        engine.close_session(s, "restore failed")
        raise
    engine.data.sync(s)
    path.unlink(missing_ok=True)  # restored once: the state lives in the session now
    log.info("session %s restored from checkpoint %s... for client %s", s.sid[:8], token[:8], client_id[:8])
    kv_tokens = {mid: int(ids.shape[1]) for mid, (ids, _) in s.restored_kv.items()}
    return {"sid": s.sid, "name": name, "kv_tokens": kv_tokens,
            "tensors": {hid: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for hid, t in s.tensors.items()}}


# -- shutdown ------------------------------------------------------------------------------------------
def save_all(engine, timeout_s: float = 10.0) -> int:
    """Write every session that asked (the engine calls this while stopping, after the drain)."""
    marked = [s for s in engine.sessions if s.checkpoint_token is not None]
    if not marked:
        return 0
    deadline = time.monotonic() + timeout_s
    while engine.data.busy() and time.monotonic() < deadline:  # let swaps in flight land first
        engine.data.poll()
        time.sleep(0.001)
    saved = 0
    for s in marked:
        try:
            path = save(engine, s)
        except Exception:  # one session's failure must not cost the others theirs
            log.exception("checkpoint of session %s failed", s.sid[:8])
            continue
        saved += 1
        log.info("session %s checkpointed to %s", s.sid[:8], path)
    return saved


def save(engine, s) -> Path:
    meta = {"format": FORMAT, "name": s.name or "", "created": str(time.time()), "models": json.dumps(sorted(s.kv))}
    return write(checked_directory(engine.cfg), file_name(s.checkpoint_token), state(engine.data, s), meta)


def write(d: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """`tensors` as safetensors file `d/name`, private from its first byte (Note [Checkpoint tokens])."""
    from safetensors.torch import save_file

    path, tmp = d / name, d / f".{secrets.token_hex(8)}.tmp"
    # Created 0600 before a byte is written; save_file then truncates and fills it, keeping its mode.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)  # a restore never sees half a file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _own_file(path: Path) -> bool:
    """True when `path` is a regular file (not a link) of this server's user that only it may read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("checkpoint file %s is not a private file of this server's user: not restored", path)
        return False
    return True


def state(data, s, host: bool = True) -> dict[str, torch.Tensor]:
    """The session's token ids, KV tensors and tensor handles as contiguous CPU tensors; `host=False`
    leaves on the device what is there (a migration over NCCL sends it from there)."""
    out: dict[str, torch.Tensor] = {}

    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous()
        return t.cpu() if host else t

    for mid, kv in s.kv.items():
        out[f"ids/{mid}"] = place(kv.ids)
        for layer, (k, v) in enumerate(data.kv_layers(s, mid, host)):
            out[f"kv/{mid}/{layer}/keys"] = k
            out[f"kv/{mid}/{layer}/values"] = v
    for mid, (ids, layers) in s.restored_kv.items():  # restored, never used since: saved as it came
        out[f"ids/{mid}"] = ids
        for layer, kv in layers.items():
            out[f"kv/{mid}/{layer}/keys"], out[f"kv/{mid}/{layer}/values"] = kv["keys"], kv["values"]
    for hid, t in s.tensors.items():
        out[f"t/{hid}"] = place(t)
    return out


def _install(engine, s, tensors: dict[str, torch.Tensor]) -> None:
    dev = engine.device
    layers: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        if key.startswith("ids/"):
            continue
        if key.startswith("t/"):
            s.tensors[key[2:]] = t.to(dev)
            continue
        m = _KV_KEY.match(key)
        if m is None or m.group(3) not in ("keys", "values"):
            raise InvalidRequest(f"checkpoint holds an unexpected tensor {key[:80]!r}")
        layers.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
    for key, ids in tensors.items():
        if not key.startswith("ids/"):
            continue
        mid = key[4:]
        got = layers.get(mid, {})
        if sorted(got) != list(range(len(got))):
            raise InvalidRequest(f"checkpoint layers of model {mid[:12]} are not 0..n-1")
        for i, kv in got.items():
            if "keys" not in kv or "values" not in kv or kv["keys"].shape != kv["values"].shape \
                    or kv["keys"].dim() != 4 or kv["keys"].shape[0] != ids.shape[0]:
                raise InvalidRequest(f"checkpoint layer {i} of model {mid[:12]} lacks keys or values of one shape")
        if len({kv["keys"].shape[2] for kv in got.values()}) > 1:
            raise InvalidRequest(f"checkpoint layers of model {mid[:12]} hold different numbers of tokens")
        s.restored_kv[mid] = (ids, got)
