"""Tier 1: the op table (Note [Op table] in djinn/srg/ops.py): kinds from schemas and tags, refusals with
their reasons, name lookups that never reach getattr for a name torch does not register, and the index
checks of the ops it newly allows (an index out of range is a CUDA device-side assert)."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.interpreter import check_indices
from djinn.srg import ops as srg_ops


@pytest.mark.parametrize("name,kind", [
    ("aten.add.Tensor", "pure"), ("aten.add_.Tensor", "inplace"), ("aten.transpose.int", "view"),
    ("aten.native_dropout.default", "random"), ("aten.bernoulli_.float", "random"),
    ("aten.nonzero.default", "dynamic_shape"), ("aten.equal.default", "data_dependent"),
    ("aten._native_batch_norm_legit.default", "mutates"), ("aten.index.Tensor", "pure"),
])
def test_kinds_come_from_schemas_and_tags(name, kind):
    assert srg_ops.lookup(name).kind == kind


@pytest.mark.parametrize("name,why", [
    ("aten.from_file.default", "reads a file"),
    ("aten.save.default", None), ("aten._print.default", None),   # not even a known aten op here, or no result
    ("aten.set_.source_Tensor", "storage"), ("aten.resize_.default", "storage"),
    ("aten._copy_from.default", "dst"), ("aten.cudnn_batch_norm.default", "running stats"),
    ("aten.add.out", "out= variant"), ("aten.equal.default", "returns bool"),
    ("aten.bincount.default", "cannot bound"), ("aten.repeat_interleave.Tensor", "cannot bound"),
    ("aten._assert_async.default", "returns nothing"), ("aten.matmul.default", "composite"),
    ("aten.embedding_dense_backward.default", "range-check"), ("aten._to_sparse.default", "not strided"),
    ("aten.pin_memory.default", "page-locked"),
])
def test_refusals_say_why(name, why):
    assert name not in srg_ops.ALLOWED
    reason = srg_ops.refusal(name)
    assert reason != "allowed" and (why is None or why in reason), reason


@pytest.mark.parametrize("name", ["aten.__class__.x", "aten.add", "torch.os.system", "aten.add.Tensor.x",
                                  "aten._ops.default", "builtins.eval.default", "aten.nosuchop.default"])
def test_names_torch_does_not_register_are_unknown(name):
    assert srg_ops.lookup(name) is None and name not in srg_ops.ALLOWED


def test_newly_allowed_families_run():
    for name in ("aten.linalg_inv_ex.default", "aten._linalg_check_errors.default", "aten._fft_r2c.default",
                 "aten.mv.default", "aten.index_add.default", "aten.scatter_reduce.two", "aten.histc.default",
                 "aten.unsafe_split.Tensor", "aten.nll_loss_forward.default", "aten.squeeze_.dim",
                 "aten.upsample_bicubic2d.default", "aten.reflection_pad1d.default", "aten.nonzero_static.default"):
        assert name in srg_ops.ALLOWED, srg_ops.refusal(name)


@pytest.mark.parametrize("op,args", [
    ("aten.nll_loss_forward.default", (torch.randn(3, 4), torch.tensor([0, 4, 1]), None, 1, -100)),
    ("aten.take.default", (torch.randn(2, 3), torch.tensor([6]))),
    ("aten.put_.default", (torch.randn(2, 3), torch.tensor([-7]), torch.zeros(1), False)),
    ("aten.index_add.default", (torch.zeros(3, 2), 0, torch.tensor([3]), torch.ones(1, 2))),
    ("aten.scatter_reduce.two", (torch.zeros(3), 0, torch.tensor([5]), torch.ones(1), "sum")),
    ("aten._embedding_bag.default", (torch.randn(5, 2), torch.tensor([0, 1, 2]), torch.tensor([0, 4]))),
    ("aten._embedding_bag_forward_only.default", (torch.randn(5, 2), torch.tensor([0, 5]), torch.tensor([0]))),
    ("aten.multi_margin_loss.default", (torch.randn(2, 3), torch.tensor([0, 3]))),
    ("aten.multilabel_margin_loss_forward.default", (torch.randn(2, 3), torch.tensor([[0, -2, 1], [1, 2, -1]]), 1)),
    ("aten.max_unpool2d.default", (torch.randn(1, 1, 2, 2), torch.tensor([[[[0, 1], [2, 16]]]]), [4, 4])),
])
def test_index_checks_refuse_out_of_range_before_the_kernel(op, args):
    with pytest.raises(IndexError, match="out of bounds"):
        check_indices(op, args)


def test_in_range_indices_and_ignored_classes_pass():
    check_indices("aten.nll_loss_forward.default", (torch.randn(3, 4), torch.tensor([0, -100, 3]), None, 1, -100))
    check_indices("aten.take.default", (torch.randn(2, 3), torch.tensor([-6, 5])))
    check_indices("aten._embedding_bag.default", (torch.randn(5, 2), torch.tensor([0, 4]), torch.tensor([0, 2])))
    check_indices("aten.multilabel_margin_loss_forward.default", (torch.randn(1, 3), torch.tensor([[2, -1, 0]]), 1))


def test_binary_cross_entropy_input_must_be_a_probability():
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        check_indices("aten.binary_cross_entropy.default", (torch.tensor([0.5, 1.5]), torch.ones(2)))
    check_indices("aten.binary_cross_entropy.default", (torch.tensor([0.0, 1.0]), torch.ones(2)))
