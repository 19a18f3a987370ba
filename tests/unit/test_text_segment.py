"""TextSegment: content-addressed, ref-counted weights with exact byte accounting."""
from __future__ import annotations

import pytest
import torch

from djinn.protocol.hashing import weight_hash
from djinn.vmu.text import TextEntry, TextSegment


@pytest.fixture
def seg():
    return TextSegment()


def test_empty(seg):
    assert len(seg) == 0
    assert seg.nbytes == 0
    assert "0" * 64 not in seg
    assert seg.refs("0" * 64) == 0


def test_entry_nbytes():
    assert TextEntry(torch.zeros(3, 4, dtype=torch.float32)).nbytes == 48
    assert TextEntry(torch.zeros(5, dtype=torch.bfloat16)).nbytes == 10
    assert TextEntry(torch.zeros(0, 7)).nbytes == 0
    assert TextEntry(torch.zeros((), dtype=torch.float64)).nbytes == 8
    # Accounting is by the tensor's own elements, not the (possibly larger) storage it views.
    assert TextEntry(torch.zeros(100)[:10]).nbytes == 40


def test_add_acquire_release_accounting(seg):
    a, b = torch.ones(10), torch.zeros(4, 4, dtype=torch.float16)
    ha, hb = weight_hash(a), weight_hash(b)
    assert seg.add(ha, a) is a
    assert (len(seg), seg.nbytes, seg.refs(ha)) == (1, 40, 1)
    assert seg.add(hb, b) is b
    assert (len(seg), seg.nbytes, seg.refs(hb)) == (2, 72, 1)
    assert seg.acquire(ha) is a
    assert seg.acquire(ha) is a
    assert (seg.refs(ha), seg.nbytes) == (3, 72)
    seg.release(ha)
    seg.release(ha)
    assert (seg.refs(ha), seg.nbytes, len(seg)) == (1, 72, 2)
    assert ha in seg and seg.get(ha) is a
    seg.release(ha)
    assert ha not in seg
    assert (seg.refs(ha), seg.nbytes, len(seg)) == (0, 32, 1)
    seg.release(hb)
    assert (len(seg), seg.nbytes) == (0, 0)


def test_add_same_hash_dedups(seg):
    first = torch.arange(8, dtype=torch.int64)
    second = first.clone()
    h = weight_hash(first)
    assert weight_hash(second) == h
    assert seg.add(h, first) is first
    assert seg.add(h, second) is first  # the stored tensor wins; the duplicate is dropped
    assert (len(seg), seg.nbytes, seg.refs(h)) == (1, 64, 2)
    seg.release(h)
    assert (seg.nbytes, seg.refs(h)) == (64, 1)
    seg.release(h)
    assert (len(seg), seg.nbytes, seg.refs(h)) == (0, 0, 0)


def test_re_add_after_free_starts_over(seg):
    t = torch.ones(3)
    h = weight_hash(t)
    seg.add(h, t)
    seg.release(h)
    t2 = torch.ones(3)
    assert seg.add(h, t2) is t2
    assert (seg.refs(h), seg.nbytes) == (1, 12)


def test_empty_tensor_entry(seg):
    t = torch.zeros(0, 3)
    h = weight_hash(t)
    seg.add(h, t)
    assert (len(seg), seg.nbytes, seg.refs(h)) == (1, 0, 1)
    seg.release(h)
    assert len(seg) == 0


def test_release_below_zero_raises(seg):
    t = torch.ones(2)
    h = weight_hash(t)
    seg.add(h, t)
    seg.release(h)
    with pytest.raises(RuntimeError, match=rf"text entry {h[:12]} released more often than acquired"):
        seg.release(h)
    assert (len(seg), seg.nbytes) == (0, 0)


def test_release_of_unknown_hash_raises(seg):
    with pytest.raises(RuntimeError, match=r"text entry abcdefabcdef released more often than acquired"):
        seg.release("abcdef" * 10 + "0123")
    assert seg.nbytes == 0


def test_over_release_leaves_other_entries_alone(seg):
    a, b = torch.ones(2), torch.ones(3)
    ha, hb = weight_hash(a), weight_hash(b)
    seg.add(ha, a)
    seg.add(hb, b)
    seg.release(ha)
    with pytest.raises(RuntimeError):
        seg.release(ha)
    assert (len(seg), seg.nbytes, seg.refs(hb)) == (1, 12, 1)


def test_acquire_and_get_unknown_hash(seg):
    with pytest.raises(KeyError):
        seg.acquire("f" * 64)
    with pytest.raises(KeyError):
        seg.get("f" * 64)
    assert len(seg) == 0 and seg.nbytes == 0


def test_holds_storage_tracks_entries_and_their_views(seg):
    w = torch.arange(12.0)
    other = torch.zeros(4)
    seg.add("a", w)
    assert seg.holds_storage(w) and seg.holds_storage(w[3:].view(3, 3)) and seg.holds_storage(w.view(3, 4).T)
    assert not seg.holds_storage(other) and not seg.holds_storage(w.clone())
    seg.add("b", w[:6])  # a second entry on the same storage: the storage stays tracked until both go
    seg.release("a")
    assert seg.holds_storage(w)
    seg.release("b")
    assert not seg.holds_storage(w)
    seg.add("c", w)
    moved = w.clone()
    seg.rehome("c", moved, "host")
    assert seg.holds_storage(moved) and not seg.holds_storage(w)
