"""Tier 1: random streams (Note [Random streams] in djinn/server/execution/rng.py): a seeded stream is bitwise what
`torch.manual_seed` gives, an unseeded one is fresh, and a stream never changes the global state."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.rng import Stream

CPU = torch.device("cpu")


@pytest.mark.parametrize("seed", [0, 5, -5, 1234, 2**63 + 7, 2**64 - 1])
def test_a_seeded_stream_is_what_manual_seed_leaves(seed):
    torch.manual_seed(seed)
    want = torch.get_rng_state()
    assert torch.equal(Stream.new(seed, CPU).cpu, want)


def test_draws_inside_are_the_seeded_local_ones_and_the_global_state_is_put_back():
    torch.manual_seed(99)
    before = torch.get_rng_state()
    torch.manual_seed(3)
    want = [torch.rand(4), torch.randn(3), torch.multinomial(torch.ones(10), 5)]
    torch.set_rng_state(before)
    s = Stream.new(3, CPU)
    with s.active():
        got = [torch.rand(4)]
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # others draw between the stream's stretches
    other = Stream.new(4, CPU)
    with other.active():
        torch.rand(7)
    with s.active():
        got += [torch.randn(3), torch.multinomial(torch.ones(10), 5)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_global_state_is_put_back_when_the_block_raises():
    before = torch.get_rng_state()
    s = Stream.new(1, CPU)
    with pytest.raises(ZeroDivisionError):
        with s.active():
            torch.rand(3)
            raise ZeroDivisionError
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1)
    torch.rand(3)
    assert torch.equal(s.cpu, torch.get_rng_state())  # what the failed stretch drew still counts


def test_unseeded_streams_are_fresh():
    torch.manual_seed(0)  # whatever the global state, unseeded streams do not come from it
    a, b = Stream.new(None, CPU), Stream.new(None, CPU)
    with a.active():
        x = torch.rand(8)
    with b.active():
        y = torch.rand(8)
    assert not torch.equal(x, y)


def test_a_copy_replays_the_same_draws_independently():
    s = Stream.new(8, CPU)
    c = s.copy()
    with s.active():
        x = torch.rand(5)
    with c.active():
        y = torch.rand(5)
    assert torch.equal(x, y)
    with s.active():
        assert not torch.equal(torch.rand(5), y)
