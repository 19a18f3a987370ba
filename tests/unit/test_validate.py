"""Tier 1: the index limits a module's tables give (djinn/server/execution/validate.py, Note [Index inputs are
checked before the device sees them]): read from the weights' rows, not from the config."""
from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, BartConfig, BartForConditionalGeneration, OPTConfig, WhisperConfig,
                          WhisperForConditionalGeneration)

from djinn.protocol.errors import InvalidRequest
from djinn.server.execution import executor
from djinn.server.execution.validate import Limits, check_forward, check_generate, limits_of

from ..models import tiny_bloom, tiny_gpt2, tiny_gptj, tiny_llama, tiny_t5


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


def _whisper():
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=128, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=24, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2)).eval()


@pytest.mark.parametrize("build,expected", [
    (tiny_gpt2, Limits(vocab=256, decoder_vocab=256, token_types=256, positions=256, logits=256)),
    (tiny_llama, Limits(vocab=256, decoder_vocab=256, token_types=256, positions=None, logits=256)),
    (_opt, Limits(vocab=100, decoder_vocab=100, token_types=100, positions=64, logits=100)),   # offset 2
    (_bart, Limits(vocab=128, decoder_vocab=128, token_types=128, positions=64, logits=128)),  # offset 2
    (tiny_gptj, Limits(vocab=256, decoder_vocab=256, token_types=256, positions=256, logits=256)),  # sin/cos buffer
    (tiny_bloom, Limits(vocab=256, decoder_vocab=256, token_types=256, positions=None, logits=256)),  # ALiBi
    (tiny_t5, Limits(vocab=256, decoder_vocab=256, token_types=256, positions=None, logits=256)),    # relative
    (_whisper, Limits(vocab=128, decoder_vocab=128, token_types=128, positions=24, logits=128)),  # decoder's table
], ids=["gpt2", "llama", "opt", "bart", "gptj", "bloom", "t5", "whisper"])
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


# -- Note [Effective generate arguments] (executor.py): the model's generation_config is checked too -------
def test_a_generation_config_cannot_bypass_the_argument_checks():
    from djinn.server.execution.executor import check_generate as check_args

    m = tiny_gpt2()
    ids = torch.ones(1, 4, dtype=torch.long)
    check_args(ids, {}, m)
    m.generation_config.num_beams = 4096  # as sent at registration, or read from generation_config.json
    with pytest.raises(InvalidRequest) as info:
        check_args(ids, {"max_new_tokens": 2}, m)
    assert info.value.message == ("generate: num_beams must be an int in [1, 64], got 4096 (from the model's "
                                  "generation_config; pass it to override)")
    check_args(ids, {"num_beams": 1}, m)  # the call overrides it, as locally
    m.generation_config.num_beams = 4
    with pytest.raises(InvalidRequest, match=r"num_beams > 1 is not supported .*from the model's generation_config"):
        check_args(ids, {}, m)
    m.generation_config.num_beams = None
    m.generation_config.num_return_sequences = 8
    with pytest.raises(InvalidRequest, match="num_return_sequences > 1"):
        check_args(ids, {}, m)
    m.generation_config.num_return_sequences = 1
    m.generation_config.max_new_tokens = -3
    with pytest.raises(InvalidRequest, match=r"max_new_tokens must be an int in \[0, 1048576\], got -3 \(from"):
        check_args(ids, {}, m)
    check_args(ids, {"max_new_tokens": 5}, m)
    check_args(ids, {}, None)  # without a module only the kwargs count (unit callers)


def test_forced_ids_past_the_scores_are_refused_from_the_config_too():
    """forced_eos_token_id / forced_bos_token_id index the scores (a device-side assert on CUDA past them):
    generate takes them (BART, Marian and mBART configs set them) in range only."""
    from djinn.server.execution.validate import check_generate as check_ids

    m = tiny_llama()
    vocab = m.config.vocab_size
    for field in ("forced_eos_token_id", "forced_bos_token_id"):
        check_ids(m, torch.ones(1, 4, dtype=torch.long), {field: vocab - 1}, 0)
        with pytest.raises(InvalidRequest, match=f"{field}={vocab}.*out of range"):
            check_ids(m, torch.ones(1, 4, dtype=torch.long), {field: vocab}, 0)
        setattr(m.generation_config, field, [3, vocab + 5])
        with pytest.raises(InvalidRequest, match=rf"{field}=\[3, {vocab + 5}\] \(from the generation_config\)"):
            check_ids(m, torch.ones(1, 4, dtype=torch.long), {}, 0)
        setattr(m.generation_config, field, None)


@pytest.mark.parametrize("field,value", [("guidance_scale", 3.0), ("return_dict_in_generate", True),
                                         ("output_scores", True), ("prompt_lookup_num_tokens", 4),
                                         ("suppress_tokens", [10**6]), ("encoder_no_repeat_ngram_size", 3),
                                         ("num_beam_groups", 2), ("cache_implementation", "static")])
def test_config_fields_generate_does_not_accept_are_refused(field, value):
    from djinn.server.execution.executor import check_generate as check_args

    m = tiny_llama()
    setattr(m.generation_config, field, value)
    with pytest.raises(InvalidRequest) as info:
        check_args(torch.ones(1, 4, dtype=torch.long), {"max_new_tokens": 2}, m)
    assert info.value.message.startswith(f"generate: the model's generation_config sets {field}={value!r}, which "
                                         "generate does not accept")


def test_neutral_config_fields_and_the_models_own_config_pass():
    from transformers import GPT2Config, GPT2LMHeadModel

    from djinn.server.execution.executor import check_generate as check_args

    m = tiny_llama()
    g = m.generation_config
    g.output_scores, g.guidance_scale, g.suppress_tokens, g.max_time = False, None, [], 5.0
    g.cache_implementation = "hybrid"  # transformers unsets it itself
    g.temperature, g.top_k, g.do_sample, g.repetition_penalty = 0.7, 40, True, 1.1
    check_args(torch.ones(1, 4, dtype=torch.long), {}, m)
    # transformers copies generation fields of the model's own config into its generation_config
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32, bos_token_id=1, eos_token_id=2,
                     guidance_scale=2.0)
    with pytest.raises(InvalidRequest, match="guidance_scale=2.0"):
        check_args(torch.ones(1, 4, dtype=torch.long), {}, GPT2LMHeadModel(cfg))


def test_the_pad_id_a_finished_row_is_fed_must_be_in_the_vocabulary():
    m = tiny_gpt2()  # vocab 256, eos 2
    ids = torch.ones(1, 4, dtype=torch.long)
    m.generation_config.pad_token_id = 10**6
    with pytest.raises(InvalidRequest) as info:
        check_generate(m, ids, {"max_new_tokens": 2}, seen=0)
    assert info.value.message.startswith("generate: pad_token_id=1000000 (from the model's generation_config, or "
                                         "its first eos_token_id) is out of range")
    check_generate(m, ids, {"max_new_tokens": 2, "pad_token_id": 0}, seen=0)  # the call overrides it
    m.generation_config.pad_token_id = None
    m.generation_config.eos_token_id = [10**6, 2]  # no pad: generate pads with the first eos id
    with pytest.raises(InvalidRequest, match="pad_token_id=1000000"):
        check_generate(m, ids, {"max_new_tokens": 2}, seen=0)
    # An eos id the model cannot generate ends no row, so nothing is fed back: GPT-2's default 50256 on a
    # small vocabulary is harmless and stays accepted.
    m.generation_config.eos_token_id = 50256
    check_generate(m, ids, {"max_new_tokens": 2}, seen=0)


def test_an_encoder_decoder_generate_counts_its_decoder_and_checks_its_start_token():
    """Note [Encoder-decoder generate]: BART's decoder starts from one token whatever the encoder reads
    (64 encoder tokens and 63 new fit its table of 64), the encoder's input must fit the table too, and
    the decoder start id, fed first, must be in the vocabulary, from the call or the generation_config."""
    m = _bart()
    check_generate(m, torch.ones(1, 64, dtype=torch.long), {"max_new_tokens": 63}, 0)
    with pytest.raises(InvalidRequest, match=r"= 65 positions"):
        check_generate(m, torch.ones(1, 4, dtype=torch.long), {"max_new_tokens": 64}, 0)
    with pytest.raises(InvalidRequest, match=r"a sequence of 65 tokens"):
        check_generate(m, torch.ones(1, 65, dtype=torch.long), {"max_new_tokens": 1}, 0)
    with pytest.raises(InvalidRequest, match=r"decoder_start_token_id=128 is out of range"):
        check_generate(m, torch.ones(1, 4, dtype=torch.long), {"decoder_start_token_id": 128}, 0)
    m.generation_config.decoder_start_token_id = -1
    with pytest.raises(InvalidRequest, match=r"decoder_start_token_id=-1 is out of range"):
        check_generate(m, torch.ones(1, 4, dtype=torch.long), {}, 0)


def test_whisper_checks_its_features_and_its_decoder_positions():
    """Note [Whisper generate]: input_features are [batch, num_mel_bins, 2 x max_source_positions] for
    forward (at most that many frames for generate, which pads), and the decoder's learned table (24 here,
    not the encoder's 16) bounds the start token + max_new_tokens; max_length counts from the start token
    and is capped at the table, as Whisper's generate does."""
    m = _whisper()
    feats = torch.zeros(1, 8, 32)
    check_forward(m, [], {"input_features": feats, "decoder_input_ids": torch.ones(1, 24, dtype=torch.long)})
    with pytest.raises(InvalidRequest, match=r"a sequence of 25 tokens"):
        check_forward(m, [], {"input_features": feats, "decoder_input_ids": torch.ones(1, 25, dtype=torch.long)})
    with pytest.raises(InvalidRequest, match=r"input_features has 7 mel bins"):
        check_forward(m, [torch.zeros(1, 7, 32)], {"decoder_input_ids": torch.ones(1, 1, dtype=torch.long)})
    with pytest.raises(InvalidRequest, match=r"input_features has 31 frames.*exactly 32"):
        check_forward(m, [torch.zeros(1, 8, 31)], {"decoder_input_ids": torch.ones(1, 1, dtype=torch.long)})
    check_generate(m, feats, {"max_new_tokens": 23}, 0)
    check_generate(m, feats[:, :, :10], {"max_new_tokens": 1}, 0)     # short audio: padded, as locally
    with pytest.raises(InvalidRequest, match=r"= 25 positions"):
        check_generate(m, feats, {"max_new_tokens": 24}, 0)
    with pytest.raises(InvalidRequest, match=r"33 frames.*long-form"):
        check_generate(m, torch.zeros(1, 8, 33), {"max_new_tokens": 1}, 0)
    assert executor.new_tokens(m, 1, {}) == 20                      # the default max_length of 20, + the start
    assert executor.new_tokens(m, 1, {"max_length": 100}) == 23     # capped at the table
    assert executor.fed_tokens(m, feats) == 16                      # the encoder's positions, not mel bins


def test_whisper_generate_arguments_it_cannot_run_are_refused_by_name():
    m = _whisper()
    feats = torch.zeros(1, 8, 32)
    executor.check_generate(feats, {"max_new_tokens": 2, "suppress_tokens": [3], "temperature": 0.5}, m)
    with pytest.raises(InvalidRequest, match="return_timestamps"):
        executor.check_generate(feats, {"return_timestamps": True}, m)
    with pytest.raises(InvalidRequest, match="input_features"):
        executor.check_generate(torch.zeros(1, 8, dtype=torch.long), {}, m)
    m.generation_config.no_timestamps_token_id = 5    # would add a start token: the real checkpoints' config
    with pytest.raises(InvalidRequest, match="no_timestamps_token_id=5 .from the model's generation_config"):
        executor.check_generate(feats, {}, m)
    m.generation_config.no_timestamps_token_id = None
    m.generation_config.lang_to_id = {"<|en|>": 3}    # language detection: another forward
    with pytest.raises(InvalidRequest, match="lang_to_id"):
        executor.check_generate(feats, {}, m)
