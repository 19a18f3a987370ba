"""Tiny Hugging Face models built from config with seeded random weights (no hub access)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 256


def _build(config, seed: int, device) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(device).eval()


def tiny_gpt2(seed: int = 0, device="cpu"):
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=256,
                     bos_token_id=1, eos_token_id=2)
    return _build(cfg, seed, device)


def tiny_llama(seed: int = 0, device="cpu"):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    return _build(cfg, seed, device)


def tiny_mistral(seed: int = 0, device="cpu"):
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=None, bos_token_id=1, eos_token_id=2)
    return _build(cfg, seed, device)


def tiny_qwen2(seed: int = 0, device="cpu"):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    return _build(cfg, seed, device)


def tiny_gptj(seed: int = 0, device="cpu"):
    from transformers import GPTJConfig

    cfg = GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
                     bos_token_id=1, eos_token_id=2)
    return _build(cfg, seed, device)


def tiny_gpt_neox(seed: int = 0, device="cpu"):
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    return _build(cfg, seed, device)


def tiny_bert(seed: int = 0, device="cpu"):
    """An encoder (BertModel: no causal-LM head)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256)
    return BertModel(cfg).to(device).eval()


TINY_BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2}


def tiny_t5(seed: int = 0, device="cpu"):
    """An encoder-decoder (T5: 2 encoder and 2 decoder blocks; a decoder block has 3 sublayers)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).to(device).eval()


# -- one tiny model per module-path causal LM (tests/unit/test_paged_step.py) -------------------------
def tiny_causal_lm(arch: str, seed: int = 0, device="cpu", **overrides):
    """A 2-layer, 64-wide `arch` with what makes the architecture differ switched on (partial rotary,
    GQA/MQA, sliding windows, softcapping, projections, inverse-layer scaling), seeded."""
    import transformers

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rope = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256)
    configs = {
        "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256,
                                    scale_attn_by_inverse_layer_idx=True, pad_token_id=None)),
        "gpt_neox": ("GPTNeoXConfig", dict(rope, rotary_pct=0.5)),
        "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256, word_embed_proj_dim=32)),
        "phi": ("PhiConfig", dict(rope, partial_rotary_factor=0.5, num_key_value_heads=2)),
        "phi3": ("Phi3Config", dict(rope, num_key_value_heads=2)),
        "gemma": ("GemmaConfig", dict(rope, num_key_value_heads=1, head_dim=16)),
        "gemma2": ("Gemma2Config", dict(rope, num_key_value_heads=2, head_dim=16, sliding_window=6,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                        query_pre_attn_scalar=24)),
        "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        new_decoder_architecture=True, num_kv_heads=2, alibi=False)),
        "falcon_mqa": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            new_decoder_architecture=False, multi_query=True,
                                            parallel_attn=True, alibi=False)),
        "falcon_alibi": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              alibi=True)),
        "llama": ("LlamaConfig", dict(rope, num_key_value_heads=2)),
        "mistral": ("MistralConfig", dict(rope, num_key_value_heads=2, sliding_window=7)),
        "qwen2": ("Qwen2Config", dict(rope, num_key_value_heads=2)),
        "qwen3": ("Qwen3Config", dict(rope, num_key_value_heads=2, head_dim=32)),
        "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)),
        "stablelm": ("StableLmConfig", dict(rope, num_key_value_heads=2, partial_rotary_factor=0.5)),
        "cohere": ("CohereConfig", dict(rope, num_key_value_heads=2, use_qk_norm=True)),
    }
    cls, kw = configs[arch]
    cfg = getattr(transformers, cls)(**{**common, **kw, **overrides})
    return _build(cfg, seed, device)


def _decoder(cls_name: str, seed: int, device, **kw):
    import transformers

    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **kw)
    return _build(cfg, seed, device)


_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)


def tiny_bloom(seed: int = 0, device="cpu"):
    """ALiBi: no position table."""
    return _decoder("BloomConfig", seed, device, hidden_size=64, n_layer=2, n_head=4)


def tiny_gpt_neo(seed: int = 0, device="cpu"):
    """A learned position table (wpe) and a local-attention layer."""
    return _decoder("GPTNeoConfig", seed, device, hidden_size=64, num_layers=2, num_heads=4,
                    attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=256)


def tiny_stablelm(seed: int = 0, device="cpu"):
    return _decoder("StableLmConfig", seed, device, **_LLAMA_LIKE)


def tiny_cohere(seed: int = 0, device="cpu"):
    return _decoder("CohereConfig", seed, device, **_LLAMA_LIKE)


def tiny_mixtral(seed: int = 0, device="cpu"):
    """Mixture of experts: 4 experts, 2 per token, grouped-query attention (2 KV heads)."""
    return _decoder("MixtralConfig", seed, device, num_local_experts=4, num_experts_per_tok=2, **_LLAMA_LIKE)


def tiny_qwen2_moe(seed: int = 0, device="cpu"):
    return _decoder("Qwen2MoeConfig", seed, device, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=64, **_LLAMA_LIKE)


def tiny_qwen3_moe(seed: int = 0, device="cpu"):
    return _decoder("Qwen3MoeConfig", seed, device, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    head_dim=16, **_LLAMA_LIKE)
