"""Tier 1: the interpreter refuses out-of-range indices before a kernel runs (on CUDA an out-of-range
index is a device-side assert that ends the process for every tenant)."""
from __future__ import annotations

import pytest
import torch

from djinn.server.interpreter import check_indices

X = torch.zeros(4, 5)


@pytest.mark.parametrize("op, args", [
    ("aten.gather.default", (X, 1, torch.tensor([[0, 4]]))),
    ("aten.gather.default", (X, -1, torch.tensor([[-5]]))),
    ("aten.index_select.default", (X, 0, torch.tensor([3, -4]))),
    ("aten.embedding.default", (X, torch.tensor([0, 3]))),
    ("aten.index.Tensor", (X, [None, torch.tensor([4, -5])])),
    ("aten.index_put.default", (X, [torch.tensor([3])], torch.tensor(1.0))),
    ("aten.add.Tensor", (X, X)),
])
def test_in_range_passes(op, args):
    check_indices(op, args)


@pytest.mark.parametrize("op, args, msg", [
    ("aten.gather.default", (X, 1, torch.tensor([[0, 5]])), "index 5 is out of bounds for dimension 1 with size 5"),
    ("aten.gather.default", (X, -1, torch.tensor([[-6]])), "index -6 is out of bounds for dimension -1 with size 5"),
    ("aten.index_select.default", (X, 0, torch.tensor([1, 4])), "index 4 is out of bounds for dimension 0 with size 4"),
    ("aten.scatter.src", (X, 0, torch.tensor([[9]]), X), "index 9 is out of bounds for dimension 0 with size 4"),
    ("aten.embedding.default", (X, torch.tensor([0, -1])), "index -1 is out of bounds for dimension 0 with size 4"),
    ("aten.index.Tensor", (X, [None, torch.tensor([1, 1000])]), "index 1000 is out of bounds for dimension 1 with size 5"),
    ("aten.index_put.default", (X, [torch.tensor([-5])], torch.tensor(1.0)),
     "index -5 is out of bounds for dimension 0 with size 4"),
])
def test_out_of_range_is_an_index_error(op, args, msg):
    with pytest.raises(IndexError) as info:
        check_indices(op, args)
    assert str(info.value) == msg
