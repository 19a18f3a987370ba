"""Swap on the CPU (the same code path as CUDA, plain copies): exact layout, bitwise round trips, and a
real transformers DynamicCache that continues generation bitwise after going to the host and back."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from djinn.vmu.host_pool import HostPool
from djinn.vmu.swap import Slot, Swapper, cache_tensors, release_cache, restore_cache

from ..models import tiny_gpt2, tiny_llama
from ._util import bits


def sample_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return [
        torch.randn(2, 4, 7, 16, generator=g),                      # 3584 B
        torch.randn(3, 5, generator=g).half(),                       # 30 B
        torch.randn(1, 2, 3, 8, generator=g).bfloat16(),             # 96 B
        torch.randint(-9, 9, (10,), generator=g),                    # int64, 80 B
        base.t(),                                                    # not contiguous, 96 B
        torch.rand(5, generator=g) > 0.5,                            # bool, 5 B
        torch.empty(2, 0, 4),                                        # no bytes
    ]


def test_swap_round_trip_is_bitwise_with_one_slot_per_tensor():
    pool = HostPool(1 << 16)
    sw = Swapper(pool, "cpu")
    ts = sample_tensors()
    h = sw.swap_out(ts)
    assert h is not None and h.done() and h.direction == "out" and h.elapsed_s() >= 0
    # One region, each tensor at the next 512-byte boundary: 3584 -> 3584, 30 -> 512, ...
    assert [(s.offset, s.nbytes) for s in h.host.slots] == [
        (0, 3584), (3584, 30), (4096, 96), (4608, 80), (5120, 96), (5632, 5), (6144, 0)]
    assert h.host.slots[4] == Slot(5120, 96, (6, 4), torch.float32)
    assert (h.host.alloc.offset, h.host.alloc.nbytes, h.nbytes) == (0, 6144, 3891) and pool.used == 6144
    for host, t in zip(h.tensors, ts):
        assert bits(host) == bits(t) and host.untyped_storage().data_ptr() == pool.buffer.data_ptr()
    back = sw.swap_in(h.host)
    back.wait()
    assert back.done() and back.direction == "in"
    for b, t in zip(back.tensors, ts):
        assert (b.shape, b.dtype, b.device) == (t.shape, t.dtype, t.device) and b.is_contiguous()
        assert bits(b) == bits(t)
        assert b.numel() == 0 or b.data_ptr() not in (t.data_ptr(), pool.buffer.data_ptr())
    sw.release(h.host)
    assert pool.used == 0 and len(pool) == 0
    pool.check()


def test_swap_out_returns_none_when_the_pool_is_full():
    pool = HostPool(4096)
    sw = Swapper(pool, "cpu")
    first = sw.swap_out([torch.ones(512)])                             # 2048 B at 0
    second = sw.swap_out([torch.ones(256), torch.ones(256)])           # 2 x 1024 B at 2048: full
    assert (first.host.alloc.offset, second.host.alloc.offset, pool.free) == (0, 2048, 0)
    assert sw.swap_out([torch.ones(1)]) is None and len(pool) == 2   # nothing allocated on failure
    sw.release(first.host)
    # 3 x 516 B = 1548 B of payload, but each slot starts on a 512 B boundary: 3072 B do not fit 2048.
    assert sw.swap_out([torch.ones(129)] * 3) is None and pool.free == 2048
    third = sw.swap_out([torch.ones(130), torch.ones(130)])            # 2 x 520 B -> 2 x 1024 B: fits
    assert third.host.alloc.offset == 0 and pool.free == 0 and third.nbytes == 1040
    pool.check()


def test_swap_rejects_what_it_cannot_do():
    sw = Swapper(HostPool(4096), "cpu")
    with pytest.raises(ValueError, match="swapper device is cpu"):
        sw.swap_out([torch.empty(4, device="meta")])
    with pytest.raises(ValueError, match="no bytes"):
        sw.swap_out([torch.empty(0)])
    with pytest.raises(TypeError, match="no `layers` list"):
        cache_tensors(object())


def first_turn(model, prompt):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    return cache, out


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_dynamic_cache_swapped_out_and_back_continues_generation_bitwise(build):
    """Two identical sessions; one's cache goes to the host pool and back between turns. The second turn
    (tokens and logits) and the final caches must be bitwise-equal to the one that never left."""
    model = build(seed=1)
    g = torch.Generator().manual_seed(2)
    prompt, turn2 = torch.randint(3, 256, (2, 10), generator=g), torch.randint(3, 256, (2, 4), generator=g)
    ref_cache, out1 = first_turn(model, prompt)
    cache, out1b = first_turn(model, prompt)
    assert torch.equal(out1, out1b)

    tensors = cache_tensors(cache)
    n_layers = model.config.num_hidden_layers
    assert list(tensors) == [(i, n) for i in range(n_layers) for n in ("keys", "values")]
    before = {k: v.clone() for k, v in tensors.items()}
    pool = HostPool(1 << 20)
    sw = Swapper(pool, "cpu")
    out_h = sw.swap_out(list(tensors.values()))
    assert out_h is not None and out_h.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    released = release_cache(cache)
    assert all(released[k] is tensors[k] for k in tensors)
    assert all(getattr(cache.layers[i], n) is None for i, n in tensors)
    del tensors, released
    out_h.wait()
    with pytest.raises((AttributeError, TypeError)):   # a swapped-out cache cannot be used by accident
        cache.get_seq_length()

    in_h = sw.swap_in(out_h.host)
    in_h.wait()
    restore_cache(cache, dict(zip(before, in_h.tensors)))
    sw.release(out_h.host)
    assert pool.used == 0
    assert all(bits(t) == bits(before[k]) for k, t in cache_tensors(cache).items())

    ids = torch.cat([out1, turn2], dim=1)
    with torch.no_grad():
        out2 = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
        ref2 = model.generate(ids, past_key_values=ref_cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out2.shape == (2, 26) and torch.equal(out2, ref2)
    final, ref_final = cache_tensors(cache), cache_tensors(ref_cache)
    assert list(final) == list(ref_final) and all(bits(final[k]) == bits(ref_final[k]) for k in final)

    # The comparison sees a wrong cache: one changed value in the restored keys changes the logits.
    probe = out2[:, -1:]
    with torch.no_grad():
        good = model(probe, past_key_values=cache).logits
        assert bits(good) == bits(model(probe, past_key_values=ref_cache).logits)
        cache.crop(-1), ref_cache.crop(-1)             # undo the probe's token in both
        cache.layers[0].keys[0, 0, 3, 0] += 1.0
        bad = model(probe, past_key_values=cache).logits
    assert bits(bad) != bits(good)
