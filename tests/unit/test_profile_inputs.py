"""Tier 1: the Stack reserve's profile prefill is a request the server would admit (Note [Profile inputs]
in djinn/server/execution/kv_pools.py). It used to be one row of max_prefill_tokens token ids, which
indexes a GPT-2's learned position table past its end: on CUDA a device-side assert that ended the
worker at the first generate of any model with such a table. Here the same inputs run on the CPU, where
an index past a table is an IndexError instead."""
from __future__ import annotations

import pytest
import torch

from djinn.server.execution.kv_pools import profile_inputs

from ..integration.test_zoo import _bart, _whisper
from ..models import VOCAB, tiny_causal_lm, tiny_llama, tiny_t5

TOKENS = 1024


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False)


@pytest.mark.parametrize("arch,rows,length", [("gpt2", 4, 256), ("opt", 4, 256), ("gptj", 4, 256)])
def test_a_position_table_splits_the_profile_into_rows_it_holds(arch, rows, length):
    model = tiny_causal_lm(arch, seed=1).eval()        # 256 positions
    old = {"input_ids": torch.randint(0, VOCAB, (1, TOKENS))}
    with pytest.raises(IndexError):                    # what the profile fed before
        _run(model, old)
    inputs = profile_inputs(model, TOKENS)
    assert tuple(inputs["input_ids"].shape) == (rows, length)
    assert int(inputs["input_ids"].max()) < VOCAB
    _run(model, inputs)


def test_rotary_models_get_one_row_of_every_token():
    inputs = profile_inputs(tiny_llama().eval(), TOKENS)
    assert tuple(inputs["input_ids"].shape) == (1, TOKENS)


@pytest.mark.parametrize("build,keys", [(_bart, {"input_ids", "decoder_input_ids"}),
                                        (tiny_t5, {"input_ids", "decoder_input_ids"}),
                                        (_whisper, {"input_features", "decoder_input_ids"})],
                         ids=["bart", "t5", "whisper"])
def test_encoder_decoder_models_get_the_inputs_their_forward_needs(build, keys):
    model = build().eval()
    inputs = profile_inputs(model, 256)
    assert set(inputs) == keys
    _run(model, inputs)
