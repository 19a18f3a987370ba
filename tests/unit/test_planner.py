"""The weight-streaming planner: resident layers, ring size, exact offsets, skip-end, reuse distances."""
from __future__ import annotations

import pytest

from djinn.vmu.planner import (
    Copy, Placement, PlanError, StreamedLayer, align_up, layout_ring, pack, plan_stream, spread,
)

GIB = 1 << 30


def test_align_and_pack():
    assert [align_up(x, 64) for x in (0, 1, 63, 64, 65, 128)] == [0, 64, 64, 64, 128, 128]
    assert pack([100, 50], 64) == ((0, 128), 192)
    assert pack([], 64) == ((), 0)
    assert pack([0, 10, 0, 10], 16) == ((0, 0, 16, 16), 32)  # empty tensors take no room
    assert pack([512, 512], 512) == ((0, 512), 1024)


def test_spread_is_even_and_exact():
    assert spread(10, 3) == (1, 5, 8)
    assert spread(4, 2) == (1, 3)
    assert spread(4, 1) == (2,)
    assert spread(5, 0) == ()
    assert spread(5, 5) == (0, 1, 2, 3, 4)
    assert spread(40, 17) == (1, 3, 5, 8, 10, 12, 15, 17, 20, 22, 24, 27, 29, 31, 34, 36, 38)
    for n in range(1, 30):
        for r in range(n + 1):
            got = spread(n, r)
            assert len(set(got)) == r and all(0 <= i < n for i in got) and list(got) == sorted(got)
    with pytest.raises(PlanError):
        spread(3, 4)


def test_everything_fits_streams_nothing():
    plan = plan_stream([[100, 50]] * 3, 100, 550, alignment=64)
    assert (plan.streaming, plan.resident, plan.streamed, plan.ring_bytes) == (False, (0, 1, 2), (), 0)
    assert plan.resident_fraction == 1.0 and plan.gpu_bytes == 550 and plan.streamed_bytes == 0


def test_uniform_layers_exact_layout_with_skip_end_at_a_layer_start():
    # Layer footprint: tensors at 0 and 128 (alignment 64), 178 bytes, aligned 192. A ring of 2 slots
    # is 384 bytes. With 634 bytes, one layer stays resident next to the 100 fixed bytes and the ring.
    plan = plan_stream([[100, 50]] * 4, 100, 634, alignment=64)
    assert plan.resident == (2,)
    assert plan.ring_bytes == 384 and plan.gpu_bytes == 634
    assert plan.streamed == (
        StreamedLayer(0, (Placement(0, 0, 100), Placement(128, 128, 50)), (Copy(0, 0, 178),), 192, 1),
        StreamedLayer(1, (Placement(192, 0, 100), Placement(320, 128, 50)), (Copy(0, 192, 178),), 192, 3),
        # head 370 aligns to 384 = the end of the ring: the next tensor skips to offset 0
        StreamedLayer(3, (Placement(0, 0, 100), Placement(128, 128, 50)), (Copy(0, 0, 178),), 192, 2),
    )
    assert plan.streamed_bytes == 450 and plan.copy_bytes == 534 and plan.host_bytes == 576
    assert plan.resident_bytes == 250 and plan.total_bytes == 700
    assert plan.resident_fraction == pytest.approx(250 / 700)


def test_ring_costs_more_than_the_last_layers_it_frees():
    sizes = [[100, 50]] * 4  # 700 bytes with the fixed 100
    assert not plan_stream(sizes, 100, 700, alignment=64).streaming
    # One byte short of everything: 3 resident + a 1-slot ring would need 100+450+192 = 742 and 2 resident
    # + a 2-slot ring 100+300+384 = 784, so only one layer stays resident (634 bytes).
    plan = plan_stream(sizes, 100, 699, alignment=64)
    assert plan.resident == (2,) and plan.gpu_bytes == 634


def test_skip_end_inside_a_layer_splits_its_copy():
    sizes = [[40, 40], [40, 40, 40], [40, 40], [40, 40], [40, 40]]
    plan = plan_stream(sizes, 0, 288, alignment=16)
    assert plan.resident == () and plan.ring_bytes == 2 * 144
    s = plan.streamed
    assert [x.layer for x in s] == [0, 1, 2, 3, 4]
    assert s[0] == StreamedLayer(0, (Placement(0, 0, 40), Placement(48, 48, 40)), (Copy(0, 0, 88),), 96, 2)
    assert s[1] == StreamedLayer(1, (Placement(96, 0, 40), Placement(144, 48, 40), Placement(192, 96, 40)),
                                 (Copy(0, 96, 136),), 144, 2)
    # 240+40 fits; the next tensor would start at 288 = the end: it skips to 0 (two copies)
    assert s[2] == StreamedLayer(2, (Placement(240, 0, 40), Placement(0, 48, 40)),
                                 (Copy(0, 240, 40), Copy(48, 0, 40)), 96, 2)
    assert s[3] == StreamedLayer(3, (Placement(48, 0, 40), Placement(96, 48, 40)), (Copy(0, 48, 88),), 96, 2)
    assert s[4] == StreamedLayer(4, (Placement(144, 0, 40), Placement(192, 48, 40)), (Copy(0, 144, 88),), 96, 3)


def test_skip_end_when_a_tensor_does_not_fit_the_tail():
    # A 100-byte tensor at head 250 of a 300-byte ring would cross the end: it starts at 0 instead,
    # leaving 250..300 unused for this pass.
    out = layout_ring([[250], [100], [30]], 300, 10)
    assert [x[0] for x in out] == [(Placement(0, 0, 250),), (Placement(0, 0, 100),), (Placement(100, 0, 30),)]
    assert [x[1] for x in out] == [(Copy(0, 0, 250),), (Copy(0, 0, 100),), (Copy(0, 100, 30),)]
    assert [x[3] for x in out] == [1, 1, 2]  # reuse distances, cyclic


def test_zero_size_tensors_are_placed_without_bytes():
    out = layout_ring([[0, 32, 0, 32]], 128, 32)
    placements, copies, host_bytes, distance = out[0]
    assert placements == (Placement(0, 0, 0), Placement(0, 0, 32), Placement(0, 32, 0), Placement(32, 32, 32))
    assert copies == (Copy(0, 0, 64),) and host_bytes == 64 and distance == 1


def test_three_slots():
    plan = plan_stream([[256]] * 6, 0, 3 * 256, alignment=256, slots=3)
    assert plan.ring_bytes == 768 and plan.resident == ()
    assert [p.tensors[0].ring_offset for p in plan.streamed] == [0, 256, 512, 0, 256, 512]
    assert [p.reuse_distance for p in plan.streamed] == [3] * 6


def test_too_small_budget_names_the_minimum():
    with pytest.raises(PlanError) as info:
        plan_stream([[100, 50]] * 4, 100, 483, alignment=64)
    msg = str(info.value)
    assert "cannot hold the always-resident weights (100 bytes" in msg
    assert "a ring of 2 slots of 192 bytes" in msg and "the smallest budget that works is 484 bytes" in msg
    assert plan_stream([[100, 50]] * 4, 100, 484, alignment=64).resident == ()


@pytest.mark.parametrize("kw, match", [
    (dict(slots=1), "at least 2 slots"), (dict(alignment=0), "alignment"), (dict(budget=0), "budget must be > 0"),
])
def test_bad_arguments(kw, match):
    args = dict(budget=1000, alignment=64, slots=2) | kw
    with pytest.raises(PlanError, match=match):
        plan_stream([[10]], 0, args.pop("budget"), **args)


def test_llama2_13b_shape_at_the_exp2_budgets():
    """The numbers exp2 will show: 40 layers of 634.4 MB, 655 MB fixed (embeddings + lm_head + norm)."""
    h, i = 5120, 13824
    layer = [h * h * 2] * 4 + [h * i * 2] * 3 + [h * 2] * 2
    fixed = 2 * 32000 * h * 2 + h * 2 + 64 * 4  # embed, lm_head, final norm, rotary inv_freq (fp32)
    expect = {8: (10, 30), 12: (17, 23), 16: (24, 16), 20: (30, 10)}
    for gib, (resident, streamed) in expect.items():
        plan = plan_stream([layer] * 40, fixed, gib * GIB)
        assert (len(plan.resident), len(plan.streamed)) == (resident, streamed)
        assert plan.gpu_bytes <= gib * GIB
        assert plan.ring_bytes == 2 * align_up(sum(align_up(x, 512) for x in layer), 512) == 1268817920
        assert plan.streamed_bytes == streamed * sum(layer)
        assert all(len(s.copies) == 1 for s in plan.streamed)  # equal layers never wrap
        # Equal layers in a 2-slot ring alternate slots: distance 2, except the first streamed layer
        # when the count is odd (it meets the last one): Note [Reuse distance].
        d = [s.reuse_distance for s in plan.streamed]
        assert d[2:] == [2] * (streamed - 2)
        assert d[:2] == ([1, 3] if streamed % 2 else [2, 2])
    assert plan_stream([layer] * 40, fixed, 12 * GIB).resident == spread(40, 17)
