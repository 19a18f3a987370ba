"""Tier 1: the index limits a module's tables give (djinn/server/validate.py, Note [Index inputs are
checked before the device sees them]): read from the weights' rows, not from the config."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BartConfig, BartForConditionalGeneration, OPTConfig

from djinn.protocol.errors import InvalidRequest
from djinn.server.validate import Limits, check_forward, check_generate, limits_of

from ..models import tiny_gpt2, tiny_llama


def _opt():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                      num_attention_heads=2, max_position_embeddings=64,
                                                      word_embed_proj_dim=16)).eval()


def _bart():
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                   max_position_embeddings=64)).eval()


@pytest.mark.parametrize("build,expected", [
    (tiny_gpt2, Limits(vocab=256, decoder_vocab=256, token_types=256, positions=256, logits=256)),
    (tiny_llama, Limits(vocab=256, decoder_vocab=256, token_types=256, positions=None, logits=256)),
    (_opt, Limits(vocab=100, decoder_vocab=100, token_types=100, positions=64, logits=100)),   # offset 2
    (_bart, Limits(vocab=128, decoder_vocab=128, token_types=128, positions=64, logits=128)),  # offset 2
], ids=["gpt2", "llama", "opt", "bart"])
def test_limits_come_from_the_tables(build, expected):
    assert limits_of(build()) == expected


def test_the_config_does_not_set_the_limit():
    m = tiny_gpt2()
    m.config.vocab_size = 10**6      # a config that claims more than the table holds
    m.config.n_positions = 10**6
    assert limits_of(m) == Limits(vocab=256, decoder_vocab=256, token_types=256, positions=256, logits=256)
    with pytest.raises(InvalidRequest, match=r"input_ids holds 300, out of range: allowed range is \[0, 256\)"):
        check_forward(m, [torch.tensor([[1, 300]])], {})


def test_opt_positions_are_checked_after_its_offset():
    m = _opt()
    check_forward(m, [torch.ones(1, 64, dtype=torch.long)], {})                     # 64 positions: the table
    with pytest.raises(InvalidRequest, match=r"a sequence of 65 tokens"):
        check_forward(m, [torch.ones(1, 65, dtype=torch.long)], {})
    with pytest.raises(InvalidRequest, match=r"position_ids holds 64, out of range: allowed range is \[0, 64\)"):
        check_forward(m, [torch.ones(1, 2, dtype=torch.long)], {"position_ids": torch.tensor([[63, 64]])})


def test_generate_counts_cached_tokens_and_the_generation_config():
    m = tiny_gpt2()
    ids = torch.ones(1, 10, dtype=torch.long)
    check_generate(m, ids, {"max_new_tokens": 246}, seen=0)
    with pytest.raises(InvalidRequest, match=r"1 cached \+ 10 new \+ 246 generated tokens = 257 positions"):
        check_generate(m, ids, {"max_new_tokens": 246}, seen=1)
    m.generation_config.max_new_tokens = 300  # no max_new_tokens in the call: the model's default counts
    with pytest.raises(InvalidRequest, match=r"0 cached \+ 10 new \+ 300 generated tokens"):
        check_generate(m, ids, {}, seen=0)
