"""The ring's schedule (djinn/vmu/ring_buffer.py RingSchedule), checked on the CPU against a model of
the ring's bytes: the GPU side only turns its decisions into event waits and copies.

Invariants, for every plan and every order of hooks (aborted passes, resumed breakpoints, threads
parked inside a layer):
- RAW: when a layer's compute is enqueued, the last copy into its bytes is the copy of this run;
- WAR: a copy issued into bytes that an enqueued compute reads waits for that compute (its `after`
  run or a later one, compute being in order), or a barrier stands between them;
- the done-event a copy waits on has been recorded for that run.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from djinn.vmu.planner import plan_stream
from djinn.vmu.ring_buffer import Issue, RingSchedule, Step, chunk_layout


@dataclass
class Compute:
    instance: int
    layer: int
    barriers: int  # barriers issued before it was enqueued


class Sim:
    def __init__(self, plan):
        self.spans = [[(c.ring_offset, c.ring_offset + c.nbytes) for c in sl.copies] for sl in plan.streamed]
        self.sched = RingSchedule([sl.reuse_distance for sl in plan.streamed])
        self.copies: list[Issue] = []
        self.computes: list[Compute] = []
        self.barriers = 0
        self.latest_done: dict[int, int] = {}
        self.evicted: set[int] = set()
        self.log: list[tuple] = []
        self.open_at: dict = {}  # thread -> (open layer, copies issued when it opened)

    def overlap(self, a: int, b: int) -> bool:
        return any(s1 < e2 and s2 < e1 for s1, e1 in self.spans[a] for s2, e2 in self.spans[b])

    def _copy(self, it: Issue) -> None:
        for comp in self.computes:
            if self.overlap(comp.layer, it.layer):
                covered = comp.barriers < self.barriers or (it.after is not None and comp.instance <= it.after)
                assert covered, f"copy {it} may overwrite bytes compute {comp} still reads"
        if it.after is not None:
            assert it.after_layer == self.sched.layer_of(it.after)
            assert self.latest_done.get(it.after_layer, -1) >= it.after, f"{it}: its done event is not recorded"
        self.copies.append(it)
        self.log.append(("copy", it.instance, it.layer, it.after))

    def _apply(self, step: Step) -> None:
        self.evicted -= set(step.restore)
        self.evicted |= set(step.evict)
        if step.barrier:
            self.barriers += 1
            self.log.append(("barrier",))
        for it in step.issues:
            self._copy(it)

    def before(self, layer: int, who=None) -> None:
        if self.sched.evicted:
            self._apply(self.sched.reap(lambda w: w in self.alive))
        self._apply(self.sched.before(layer, who))
        u = self.sched.executed
        last = max(i for i, c in enumerate(self.copies) if c.layer == layer)
        assert self.copies[last].instance == u, "the compute would wait for another run's copy"
        for c in self.copies[last + 1:]:
            assert not self.overlap(c.layer, layer), f"copy {c} lands on layer {layer} before it computes"
        self.computes.append(Compute(u, layer, self.barriers))
        self.log.append(("compute", u, layer))
        self.open_at[who] = (layer, len(self.copies))

    def after(self, layer: int, who=None) -> None:
        opened = self.open_at.pop(who, None)
        if opened is not None and opened[0] == layer:
            # A layer whose bytes were overwritten while it was open (its thread parked) must have been
            # rebound to a private copy before it reads them again.
            if any(self.overlap(c.layer, layer) for c in self.copies[opened[1]:]):
                assert layer in self.evicted, f"layer {layer} resumes on ring bytes other runs overwrote"
        step = self.sched.after(layer, who)
        if step.advanced:
            self.latest_done[layer] = self.sched.executed - 1
        self._apply(step)

    alive: set = set()

    def forward(self, who=None, start: int = 0, stop: int | None = None) -> None:
        for k in range(start, self.sched.m if stop is None else stop):
            self.before(k, who)
            self.after(k, who)


def plan_of(layer_sizes, alignment=16, extra=0, slots=2):
    """All layers streamed (the smallest budget), or fewer with `extra` bytes."""
    from djinn.vmu.planner import pack

    ring = min(slots, len(layer_sizes)) * max(pack(s, alignment)[1] for s in layer_sizes)
    plan = plan_stream(layer_sizes, 0, ring + extra, alignment=alignment, slots=slots)
    assert plan.streaming
    return plan


def test_golden_order_four_equal_layers_double_buffered():
    plan = plan_of([[64]] * 4, alignment=64)
    assert [sl.reuse_distance for sl in plan.streamed] == [2, 2, 2, 2] and plan.ring_bytes == 128
    sim = Sim(plan)
    sim.forward()
    sim.forward()
    assert sim.log == [
        ("copy", 0, 0, None), ("copy", 1, 1, None), ("compute", 0, 0),  # cold start: both slots at once
        ("copy", 2, 2, 0), ("compute", 1, 1),                             # layer 0 done: refill its slot
        ("copy", 3, 3, 1), ("compute", 2, 2),
        ("copy", 4, 0, 2), ("compute", 3, 3),                             # the next pass, prefetched
        ("copy", 5, 1, 3), ("compute", 4, 0),
        ("copy", 6, 2, 4), ("compute", 5, 1), ("copy", 7, 3, 5), ("compute", 6, 2),
        ("copy", 8, 0, 6), ("compute", 7, 3), ("copy", 9, 1, 7),
    ]
    assert sim.sched.resyncs == 0


def test_golden_order_odd_count_bubble_at_the_pass_boundary():
    # Three equal layers in two slots: layer 0 shares its slot with layer 2 (distance 1 across passes),
    # layer 1 only meets itself (distance 3). Copies are issued in order, so the next pass's layer 1
    # queues behind layer 0, which waits for layer 2's compute.
    plan = plan_of([[64]] * 3, alignment=64)
    assert [sl.reuse_distance for sl in plan.streamed] == [1, 3, 2]
    sim = Sim(plan)
    sim.forward()
    sim.forward()
    assert sim.log == [
        ("copy", 0, 0, None), ("copy", 1, 1, None), ("compute", 0, 0),
        ("copy", 2, 2, 0), ("compute", 1, 1), ("compute", 2, 2),
        ("copy", 3, 0, 2), ("copy", 4, 1, 1), ("compute", 3, 0),
        ("copy", 5, 2, 3), ("compute", 4, 1), ("compute", 5, 2),
        ("copy", 6, 0, 5), ("copy", 7, 1, 4),
    ]


def test_an_aborted_pass_resyncs_with_a_barrier():
    sim = Sim(plan_of([[64]] * 4, alignment=64))
    sim.forward()
    sim.before(0)
    sim.after(0)
    sim.before(1)   # raises inside layer 1: no post-hook
    sim.forward()   # the next pass starts at layer 0: out of order, barrier, copies issued again
    assert sim.sched.resyncs == 1 and ("barrier",) in sim.log
    sim.forward()
    assert sim.sched.resyncs == 1


def test_resume_after_other_passes():
    sim = Sim(plan_of([[32], [48], [32], [16], [64]], alignment=16))
    sim.forward(stop=2)        # paused after layer 1 (a breakpoint between layers)
    sim.forward()              # other sessions run the model
    sim.forward()
    sim.forward(start=2)       # resume: layers 2..4 of the paused pass
    sim.forward()
    assert sim.sched.resyncs == 2


def test_a_thread_parked_inside_a_layer_is_evicted_and_restored():
    sim = Sim(plan_of([[64]] * 4, alignment=64))
    sim.alive = {"A", "B"}
    sim.forward("A", stop=2)
    sim.before(2, "A")                         # A parks inside layer 2
    sim.before(0, "B")                         # B starts a pass: A's layer 2 is evicted, and a barrier
    assert sim.evicted == {2} and sim.sched.evicted == {2: {"A"}}
    assert sim.log[-4:] == [("barrier",), ("copy", 2, 0, None), ("copy", 3, 1, None), ("compute", 2, 0)]
    sim.after(0, "B")
    sim.forward("B", start=1)
    sim.forward("B")
    assert sim.sched.evicted == {2: {"A"}}     # still parked
    step = sim.sched.after(2, "A")             # A resumes and finishes layer 2 on its private copy
    assert step == Step(restore=(2,)) and sim.sched.evicted == {}
    sim.forward("A", start=3)
    sim.forward("B")


def test_a_parked_thread_that_dies_is_reaped():
    sim = Sim(plan_of([[64]] * 3, alignment=64))
    sim.alive = {"A", "B"}
    sim.before(0, "A")
    sim.after(0, "A")
    sim.before(1, "A")                          # parks
    sim.forward("B")                            # evicts layer 1
    assert sim.sched.evicted == {1: {"A"}} and sim.evicted == {1}
    sim.alive = {"B"}                           # the run was cancelled: its thread ended
    sim.forward("B")
    assert sim.sched.evicted == {} and sim.evicted == set()


def test_two_threads_parked_in_the_same_layer():
    sched = RingSchedule([2, 2])
    sched.before(0, "A")
    assert sched.before(0, "B").evict == (0,)   # A parked in layer 0
    assert sched.before(1, "C").evict == ()     # B parked in layer 0 too: already evicted
    assert sched.evicted == {0: {"A", "B"}}
    assert sched.after(0, "A") == Step()
    assert sched.after(0, "B") == Step(restore=(0,))


def test_hooks_out_of_pairs_is_a_loud_error():
    sched = RingSchedule([2, 2])
    sched.before(0)
    sched.open[None] = 1  # corrupt: the running layer is not the expected one
    with pytest.raises(RuntimeError, match="bug in the ring schedule"):
        sched.after(1)


@pytest.mark.parametrize("bad", [[], [0], [3, 1]])
def test_bad_distances(bad):
    with pytest.raises(ValueError, match="reuse distances"):
        RingSchedule(bad)


@pytest.mark.parametrize("seed", range(60))
def test_random_plans_and_hook_orders(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    sizes = [[rng.choice([0, rng.randint(1, 300)]) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    if all(s == 0 for layer in sizes for s in layer):
        sizes[0].append(17)
    from djinn.vmu.planner import pack

    extra = rng.choice([0, 0, rng.randint(0, 2 * max(pack(s, 16)[1] for s in sizes))])
    try:
        plan = plan_of(sizes, alignment=16, extra=extra, slots=rng.choice([2, 2, 3]))
    except AssertionError:  # everything fit: nothing to stream
        return
    sim = Sim(plan)
    m = sim.sched.m
    sim.alive = {"A", "B", "C"}
    for _ in range(40):
        r = rng.random()
        who = rng.choice(["A", "A", "A", "B", "C"])
        if r < 0.55:
            sim.forward(who)
        elif r < 0.7:                       # a pass that raises inside a layer
            k = rng.randrange(m)
            sim.forward(who, stop=k)
            sim.before(k, who)
        elif r < 0.85:                      # a pass that stops or starts between layers
            a = rng.randrange(m + 1)
            sim.forward(who, start=a, stop=rng.randint(a, m))
        else:                               # park inside a layer, others run, then resume or die
            k = rng.randrange(m)
            sim.forward("P", stop=k)
            sim.alive.add("P")
            sim.before(k, "P")
            for _ in range(rng.randint(1, 3)):
                sim.forward(rng.choice(["A", "B"]))
            if rng.random() < 0.7:
                sim.after(k, "P")
                sim.forward("P", start=k + 1)
            sim.alive.discard("P")
    assert sim.computes, "nothing ran"


def test_chunk_layout_groups_layers_into_power_of_two_chunks():
    mb = 634_414_080  # one Llama-2-13B layer, packed
    chunks, where = chunk_layout([mb] * 23, 512)
    assert chunks == (13 * mb, 6 * mb, 3 * mb, mb)        # 8 GiB, 4 GiB, 2 GiB, 1 GiB capacities
    assert where[:2] == ((0, 0), (0, mb)) and where[13] == (1, 0) and where[22] == (3, 0)
    assert sum(chunks) == 23 * mb
    assert chunk_layout([100, 30, 0, 5], 16) == ((112, 32, 16), ((0, 0), (1, 0), (1, 32), (2, 0)))
    assert chunk_layout([], 16) == ((), ())
    # a buffer larger than the cap gets a chunk of its own
    assert chunk_layout([10, 300, 10], 16, cap=64) == ((16, 304, 16), ((0, 0), (1, 0), (2, 0)))
