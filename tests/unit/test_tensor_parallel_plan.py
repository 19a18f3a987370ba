"""Tier 1: the tensor-parallel plan a model is sharded by (Note [Tensor-parallel sessions] in
djinn/server/cluster/tensor_parallel.py): the architecture's transformers plan, one PyTorch style per
layer module, and the refusals that name why."""
from __future__ import annotations

import pytest
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from djinn.protocol.errors import InvalidRequest, ModelNotSupported
from djinn.server.cluster import tensor_parallel

from ..models import tiny_causal_lm, tiny_llama


def test_a_llama_plan_shards_attention_and_mlp_per_layer():
    plan = tensor_parallel.plan(tiny_llama(), 2)
    col = {f"model.layers.{i}.{m}" for i in (0, 1) for m in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    row = {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert set(plan) == col | row
    assert all(isinstance(plan[n], ColwiseParallel) for n in col)
    assert all(isinstance(plan[n], RowwiseParallel) for n in row)


def test_heads_that_do_not_split_and_styles_it_lacks_are_refused():
    with pytest.raises(ModelNotSupported, match="num_key_value_heads=2 does not split over tp=4"):
        tensor_parallel.plan(tiny_llama(), 4)
    gpt2 = tiny_causal_lm("gpt2")
    with pytest.raises(ModelNotSupported):
        tensor_parallel.plan(gpt2, 2)


def test_tp_is_checked_against_the_workers():
    assert tensor_parallel.check(None, 2) is None and tensor_parallel.check(1, 2) is None
    assert tensor_parallel.check(2, 2) == 2
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(InvalidRequest):
            tensor_parallel.check(bad, 2)
    assert tensor_parallel.check(2, 4) == 2 and tensor_parallel.check(4, 4) == 4
    for tp, world in ((3, 2), (3, 4), (4, 6)):
        with pytest.raises(InvalidRequest, match=f"needs a block of {tp} workers"):
            tensor_parallel.check(tp, world)


def test_tp_blocks_are_aligned():
    assert tensor_parallel.blocks(4, 2) == [[0, 1], [2, 3]]
    assert tensor_parallel.blocks(6, 3) == [[0, 1, 2], [3, 4, 5]]
    assert tensor_parallel.blocks(2, 2) == [[0, 1]]
