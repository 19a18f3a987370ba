"""Tier 1: the front's pure parts (djinn/server/cluster/): merging every worker's stats, reading a reply's
request id from its frames, and placement."""
from __future__ import annotations

import torch

from djinn.protocol import codec
from djinn.protocol.messages import MsgType
from djinn.server.cluster import front, merge, wire


class _W:
    def __init__(self, rank, device="cpu", alive=True, free=0):
        self.rank, self.device, self.alive, self.info = rank, device, alive, {"pid": 100 + rank}
        self.load = {"free_kv_bytes": free}
        self.ready = True


class _F:
    def __init__(self, workers):
        self.workers = workers
        self.moves = type("Moves", (), {"balance_moves": 2})()


def test_stats_of_two_workers_merge_into_one():
    parts = {
        0: {"device": "cpu", "requests_served": 5, "sessions": {"a": {"mine": True}},
            "models": {"m": {"sessions": ["a"], "bytes": 10}},
            "segments": {"text": 10, "data": 3, "workspace_parts": {"decode": 2}},
            "kv": {"block_tokens": 16, "models": {"m": {"block_tokens": 16, "blocks_total": 8, "blocks_free": 5}}},
            "scheduler": {"policy": "signal", "swaps_out": 1, "queued": 0}},
        1: {"device": "cpu", "requests_served": 7, "sessions": {"b": {"mine": False}},
            "models": {"m": {"sessions": ["b"], "bytes": 10}, "n": {"sessions": ["b"], "bytes": 4}},
            "segments": {"text": 14, "data": 1, "workspace_parts": {"decode": 3}},
            "kv": {"block_tokens": 16, "models": {"m": {"block_tokens": 16, "blocks_total": 8, "blocks_free": 2}}},
            "scheduler": {"policy": "signal", "swaps_out": 2, "queued": 4}},
    }
    got = merge.merge_stats(parts, _F([_W(0), _W(1, alive=True), _W(2, alive=False)]))
    assert got["sessions"] == {"a": {"mine": True, "worker": 0}, "b": {"mine": False, "worker": 1}}
    assert got["models"]["m"] == {"sessions": ["a", "b"], "bytes": 10, "workers": [0, 1]}
    assert got["models"]["n"]["workers"] == [1]
    assert got["segments"] == {"text": 24, "data": 4, "workspace_parts": {"decode": 5}}
    assert got["kv"] == {"block_tokens": 16, "models": {"m": {"block_tokens": 16, "blocks_total": 16, "blocks_free": 7}}}
    assert got["scheduler"] == {"policy": "signal", "swaps_out": 3, "queued": 4}
    assert got["requests_served"] == 12 and got["device"] == "cpu, cpu"
    assert got["cluster"] == {"workers": 3, "live": 2, "balance_moves": 2}
    assert [(w["rank"], w["alive"]) for w in got["workers"]] == [(0, True), (1, True), (2, False)]
    assert got["workers"][1]["pid"] == 101 and got["workers"][1]["sessions"] == 1


def test_a_replys_request_id_is_read_from_its_frames():
    small = codec.encode(MsgType.REPLY, {"rid": 41, "result": {"x": torch.ones(2000)}})
    assert wire.reply_rid(small) == (41, True)
    assert wire.reply_rid(codec.encode(MsgType.STREAM, {"rid": 7, "tokens": [1, 2]})) == (7, False)
    assert wire.reply_rid(codec.encode(MsgType.ERROR, {"rid": 9, "code": "X", "message": "m"})) == (9, True)
    # a header longer than one wire frame continues in the message's last frames
    big = codec.encode(MsgType.REPLY, {"rid": 12, "result": "y" * (3 << 20)})
    assert len(big) > 2 and wire.reply_rid(big) == (12, True)


def test_placement_takes_the_most_free_kv_then_the_fewest_sessions():
    f = front.Front.__new__(front.Front)
    f.workers = [_W(0, free=100), _W(1, free=300), _W(2, free=300)]
    f.sessions, f.span = {"s1": 1}, {}
    assert f.place().rank == 2           # 1 and 2 tie on free KV; 2 holds fewer sessions
    # a tensor-parallel session counts on every worker of its span: 1 and 2 hold two sessions each
    f.sessions, f.span = {"s1": 1, "tp": 1, "s2": 2}, {"tp": (1, 2)}
    assert f.place().rank == 1
    f.workers[2].alive = False
    assert f.place().rank == 1
    assert f.place([f.workers[0]]).rank == 0


def test_a_servers_workers_show_a_line_each():
    from djinn.frontend.stats_view import render_text
    from djinn.frontend.top import render_frame

    st = {"device": "cuda:0, cuda:1", "segments": {"text": 2 << 30},
          "workers": [{"rank": 0, "device": "cuda:0", "alive": True, "sessions": 3,
                       "segments": {"text": 1 << 30, "data": 5 << 20}},
                      {"rank": 1, "device": "cuda:1", "alive": False}]}
    text = render_text(st)
    assert "worker 0   cuda:0: 3 sessions, text 1.0 GiB, data 5.0 MiB" in text
    assert "worker 1   cuda:1: dead (its sessions were lost)" in text
    assert "worker 0: cuda:0: 3 sessions" in render_frame(st, None, width=0)
