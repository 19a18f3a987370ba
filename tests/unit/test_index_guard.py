"""Tier 1: the interpreter refuses out-of-range indices before a kernel runs (on CUDA an out-of-range
index is a device-side assert that ends the process for every tenant)."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.interpreter import check_indices

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


def test_loss_targets_are_classes_or_the_ignore_index():
    """F.cross_entropy on the graph path records nll_loss_forward, which reads input[i, target[i]]."""
    logits, maps = torch.zeros(3, 5), torch.zeros(2, 5, 4, 4)
    check_indices("aten.nll_loss_forward.default", (logits, torch.tensor([0, 4, -100]), None, 1, -100))
    check_indices("aten.nll_loss_forward.default", (logits[0], torch.tensor(4), None, 1, -100))
    check_indices("aten.nll_loss2d_forward.default", (maps, torch.full((2, 4, 4), 7), None, 1, 7))
    with pytest.raises(IndexError, match="index 5 is out of bounds for the classes with size 5"):
        check_indices("aten.nll_loss_forward.default", (logits, torch.tensor([0, 5, 1]), None, 1, -100))
    with pytest.raises(IndexError, match="index -1 is out of bounds for the classes with size 5"):
        check_indices("aten.nll_loss_forward.default", (logits, torch.tensor([-1, 0, 1]), None, 1, -100))
    with pytest.raises(IndexError, match="index 5 is out of bounds for the classes with size 5"):
        check_indices("aten.nll_loss2d_forward.default", (maps, torch.full((2, 4, 4), 5), None, 1, -100))
