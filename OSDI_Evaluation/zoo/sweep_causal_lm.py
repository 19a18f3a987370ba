"""Sweep every class of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES through Djinn's module path.

For each class (one model type per class: the one whose config class the class names), a tiny config
(2 layers, hidden 64, vocabulary 256, a position limit of P = 64: a generic builder over the usual
config names, `OVERRIDES` where those do not fit) and seeded random weights on the CPU, then, against
one embedded CPU server whose `--config` allow-lists every class of the mapping, in order:

The builder's generic rules: TINY's keys wherever the default config has them (BART-style
encoder_/decoder_ sizes included), MLA's latent widths where the config has them, every per-layer list
of the default config (layer kinds, MLP kinds, sparsity...) cut to two layers, the first and the first
of another kind (an attention layer preferred), so a hybrid keeps both kinds; the same inside each
sub-config; a class whose config class is a sub-config of its model type (Musicgen's decoder, Emu3's
text model) gets that sub-config. `DROP` names keys a config refuses to be given.

  build          the class builds from the tiny config without extra packages or remote code
  decoder_only   its config is not an encoder-decoder
  local          a local greedy `generate` runs (else nothing to compare with)
  module_path    `RemoteModel.from_module` puts it on the module path (the server builds it)
  greedy         greedy generate bitwise the local generate's
  sampled        seeded sampled generate (top_k) bitwise the local one's
  session_kv     a session's two generates continue its paged KV as a local DynamicCache does
  token_range    an input id = vocabulary size is InvalidRequest before any kernel
  length_range   generates of P-1, P, P+1 and P+8 tokens in all (prompt + new): where the local
                 generate runs, the server's is bitwise it (or a typed InvalidRequest); where it fails
                 (an index past a position table), the server's is InvalidRequest, never an error
                 from inside the model. Sliding windows are set to 16 tokens, so a model that slides
                 is compared past its window.

and the server must still be alive (a dead server is recorded and a fresh one started). The first
failing check and its error are recorded; the table goes to results/causal_lm_sweep.json with the
transformers and torch versions.

    PYTHONPATH=. python OSDI_Evaluation/zoo/sweep_causal_lm.py [--only Llama,GPT2] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

VOCAB = 256
P = 64                      # the position limit the tiny configs ask for
WINDOW = 16                 # sliding windows, where a config has one
IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
MORE = torch.tensor([[33, 8, 120]])
ARCH_TIMEOUT_S = 240
#: Config keys of attention that sees only part of the sequence (sliding windows, Llama-4's chunks).
WINDOW_KEYS = ("sliding_window", "attention_chunk_size", "attention_window", "window_size")
#: Index-like inputs validate.py range-checks (Note [Index inputs are checked before the device sees them]).
CHECKED_INDEX_INPUTS = {"input_ids", "decoder_input_ids", "token_type_ids", "position_ids", "cache_position",
                        "decoder_position_ids", "labels", "logits_to_keep"}
#: Forward parameters that take an image, audio or video (a multimodal model: those inputs are not swept).
MEDIA = ("pixel", "image", "audio", "video", "input_features", "vision", "patches", "cross_attention")

# Config keys set wherever the default config has them (aliases included via attribute_map).
TINY = dict(
    vocab_size=VOCAB,
    num_hidden_layers=2, n_layer=2, n_layers=2, num_layers=2,
    hidden_size=64, n_embd=64, d_model=64,
    intermediate_size=128, n_inner=128, ffn_dim=128, ffn_hidden_size=128,
    num_attention_heads=4, n_head=4, n_heads=4,
    num_key_value_heads=2, head_dim=16,
    max_position_embeddings=P, n_positions=P, max_seq_len=P, seq_length=P, n_ctx=P,
    # mixture of experts: small, every token routed
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
    n_group=1, topk_group=1,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
    tie_word_embeddings=False,
    use_cache=True,
    is_decoder=True,        # encoder families (BERT, RoBERTa, ...) as causal decoders, as their CausalLM expects
    # BART-style configs name their decoder's (and encoder's) sizes separately
    encoder_layers=2, decoder_layers=2, num_encoder_layers=2, num_decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
)
#: Multi-head latent attention (DeepSeek-V2/V3 and their descendants), where the default config has it:
#: rotary and non-rotary query/key parts and the value width small, and `head_dim` the rotary part's
#: (as the configs' own __post_init__ sets it; TINY's head_dim would override that).
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8)
#: Config keys naming each layer's kind; every list of the default config as long as its layer count is
#: cut to the TINY layers this picks (the first layer, and the first of another kind, so a hybrid keeps
#: both kinds: an attention layer and a linear-attention/state-space one).
LAYER_KIND_KEYS = ("layer_types", "layers_block_type")
# Per model type, on top of TINY (or where TINY's guesses do not fit the config).
OVERRIDES: dict[str, dict] = {
    "gpt_bigcode": dict(n_inner=128),
    "falcon": dict(num_kv_heads=4, num_key_value_heads=4, new_decoder_architecture=False, multi_query=False),
    "gptj": dict(rotary_dim=8),
    "lfm2": dict(full_attn_idxs=[1], layer_types=["conv", "full_attention"]),   # a conv layer too
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_layers=2),
    "codegen": dict(rotary_dim=8, n_ctx=P),
    "persimmon": dict(partial_rotary_factor=0.5),
    "phi": dict(partial_rotary_factor=0.5),
    "stablelm": dict(partial_rotary_factor=0.25),
    "mpt": dict(d_model=64, n_heads=4, max_seq_len=P, expansion_ratio=2),
    "reformer": dict(axial_pos_shape=[8, 8], axial_pos_embds_dim=[32, 32], attn_layers=["local", "lsh"],
                     hidden_size=64, attention_head_size=16, feed_forward_size=128, max_position_embeddings=P),
    "xlnet": dict(d_inner=128),
    "ctrl": dict(dff=128),
    "transfo-xl": dict(d_embed=64),
    "openai-gpt": dict(n_positions=P),
    "bloom": dict(n_head=4),
    "jais2": dict(),
    "rwkv": dict(attention_hidden_size=64, context_length=P),
    "deepseek_v2": dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "deepseek_v3": dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    # DeepSeek sparse attention's indexer (DeepSeek-V3.2 and its descendants)
    "deepseek_v32": dict(index_n_heads=4, index_head_dim=16, index_topk=4),
    "glm_moe_dsa": dict(index_n_heads=4, index_head_dim=16, index_topk=16),
    "axk2": dict(index_n_heads=4, index_head_dim=16, index_topk=16),
    # state-space / linear-attention hybrids: Mamba heads that fit hidden 64, one attention layer
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16),
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"], mamba_n_heads=8, mamba_d_head=16,
                             mamba_d_state=16, mamba_chunk_size=16),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  use_mamba_kernels=False, mamba_dt_rank=8, mamba_d_state=16),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], head_dim=16, lru_width=64),
    "mamba2": dict(num_heads=8, head_dim=16, expand=2, n_groups=1, state_size=16, chunk_size=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "qwen4_exp_text": dict(head_dim=16, indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=16,
                           linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                           linear_num_value_heads=4, ple_embed_dim=64,
                           indexer_budget=16, indexer_compress_ratio=4),
    "inkling2_text": dict(swa_head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                          n_layers_per_attn_res_block=1),
    "inkling2_loop_text": dict(swa_head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                               n_layers_per_attn_res_block=1),
    "xlstm": dict(embedding_dim=64, num_blocks=2, num_heads=4, chunk_size=8, max_inference_chunksize=64),
    "zaya": dict(num_experts_per_tok=1, head_dim=16),
    "kolibri1_1": dict(layer_types=["sliding_attention", "indexed_attention"], index_layers=[1],
                       kv_source_layers=[0, 1], mlp_only_layers=[0], index_num_heads=2, index_topk=16),
    "gemma3n_text": dict(num_kv_shared_layers=0, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                         laurel_rank=8, altup_num_inputs=2),
    "musicgen": dict(decoder=dict(num_codebooks=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),                # one codebook: ids of shape (1, n)
    "musicgen_melody": dict(decoder=dict(num_codebooks=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),   # modeling reads both
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
}
#: Keys TINY has that a config refuses to be given (a setter that raises): left at their defaults.
DROP: dict[str, set] = {
    "xlnet": {"max_position_embeddings"},         # no sequence length limit; its setter says so
    "prophetnet": {"num_hidden_layers"},          # num_encoder_layers/num_decoder_layers instead
}


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    mla = MLA if hasattr(default, "kv_lora_rank") and hasattr(default, "qk_rope_head_dim") else {}
    kw = {**TINY, **mla, **_per_layer(default), **OVERRIDES.get(model_type, {})}
    chosen = {k: v for k, v in kw.items()
              if ((hasattr(default, k) and not _read_only(cls, k)) or k in OVERRIDES.get(model_type, {}))
              and k not in DROP.get(model_type, ())}
    for key in WINDOW_KEYS:
        if isinstance(getattr(default, key, None), int) and getattr(default, key) > 0:
            chosen[key] = WINDOW
    # A config of sub-configs (a multimodal model's text_config): make the text part tiny too.
    for key in getattr(default, "sub_configs", None) or {}:
        sub = getattr(default, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            sub_kw = {k: v for k, v in {**TINY, **_per_layer(sub)}.items() if hasattr(sub, k)}
            sub_kw.update({k: WINDOW for k in WINDOW_KEYS if isinstance(getattr(sub, k, None), int)})
            own = OVERRIDES.get(model_type, {}).get(key)
            chosen[key] = {**sub.to_dict(), **sub_kw, **(own if isinstance(own, dict) else {})}
    return cls(**chosen)


def _per_layer(default, n: int = 2) -> dict:
    """The default config's per-layer lists (layer kinds, MLP kinds, sparsity, ...) cut to `n` layers:
    the first layer, then the first layer of a kind not yet picked, preferring an attention kind."""
    try:
        layers = default.num_hidden_layers
    except Exception:  # noqa: BLE001 - a per-layer config's global read; nothing to cut
        return {}
    if not isinstance(layers, int) or layers <= n:
        return {}
    lists = {k: v for k, v in vars(default).items()
             if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == layers}
    if not lists:
        return {}
    kinds = next((list(lists[k]) for k in LAYER_KIND_KEYS if k in lists), None)
    pick = [0]
    if kinds is not None:
        others = [i for i in range(layers) if kinds[i] not in {kinds[j] for j in pick}]
        attention = [i for i in others if "attention" in str(kinds[i]) and "linear" not in str(kinds[i])]
        pick += (attention or others)[:n - 1]
    pick += [i for i in range(layers) if i not in pick][:n - len(pick)]
    pick.sort()
    return {k: type(v)(v[i] for i in pick) for k, v in lists.items()}


def _read_only(cls, key: str) -> bool:
    prop = getattr(cls, key, None)
    return isinstance(prop, property) and prop.fset is None


def build(cls_name: str, model_type: str):
    import transformers

    cls = getattr(transformers, cls_name)
    cfg = tiny_config(model_type)
    # A class whose config is one of the model type's sub-configs (Musicgen's decoder, Emu3's text model)
    want = getattr(cls, "config_class", None)
    if want is not None and not isinstance(cfg, want):
        cfg = next((sub for key in getattr(cfg, "sub_configs", None) or {}
                    if isinstance(sub := getattr(cfg, key, None), want)), cfg)
    with torch.device("meta"):
        meta = cls(cfg)
    n = sum(p.numel() for p in meta.parameters())
    if n > 30_000_000:
        raise RuntimeError(f"the tiny config still has {n / 1e6:.0f}M parameters (an override is missing)")
    torch.manual_seed(0)
    return cfg, cls(cfg).eval()


def local_generate(model, ids, seed=None, cache=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        if cache is not None:
            kw["past_key_values"] = cache
        return model.generate(ids, **kw)


class Fail(Exception):
    def __init__(self, check: str, error: str):
        super().__init__(f"{check}: {error}")
        self.check, self.error = check, error


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"


def _step(check: str, fn):
    try:
        return fn()
    except Fail:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is a row of the table
        raise Fail(check, _err(e)) from None


def check_arch(conn, cls_name: str, model_type: str) -> dict:
    import djinn
    from djinn.frontend.remote import RemoteModel

    cfg, model = _step("build", lambda: build(cls_name, model_type))
    if getattr(cfg, "is_encoder_decoder", False):
        raise Fail("decoder_only", "an encoder-decoder config")
    greedy = dict(max_new_tokens=6, do_sample=False)
    sampled = dict(max_new_tokens=6, do_sample=True, top_k=50)
    ref = _step("local", lambda: local_generate(model, IDS, **greedy))
    _static_checks(model)
    with conn.session(f"sweep-{cls_name}") as s:
        rm = _step("module_path", lambda: RemoteModel.from_module(s, model))
        if rm.path != "module":
            raise Fail("module_path", f"path {rm.path}: {rm.reason}")
        got = _step("greedy", lambda: rm.generate(IDS, **greedy))
        if not torch.equal(got, ref):
            raise Fail("greedy", f"tokens differ: server {got.tolist()} local {ref.tolist()}")
        ref = local_generate(model, IDS, seed=11, **sampled)
        got = _step("sampled", lambda: rm.generate(IDS, seed=11, **sampled))
        if not torch.equal(got, ref):
            raise Fail("sampled", f"tokens differ: server {got.tolist()} local {ref.tolist()}")
        _session_kv(s, rm, model, greedy)
        rows = _rows(model)
        bad = IDS.clone()
        bad[0, 3] = rows
        try:
            rm.generate(bad, max_new_tokens=2)
            raise Fail("token_range", f"input id {rows} (the input embedding's rows) was not refused")
        except djinn.InvalidRequest as e:
            if "input_ids" not in str(e):
                raise Fail("token_range", f"refused, but not for input_ids: {_err(e)}") from None
        except Fail:
            raise
        except Exception as e:  # noqa: BLE001
            raise Fail("token_range", _err(e)) from None
        notes = _length_range(rm, model)
    window = _window(cfg)
    if window:
        raise Fail("local_attention", f"{window}: Djinn's paged KV keeps every position and masks, so outputs "
                                      "are bitwise a local generate's only while the sequence fits the window "
                                      "(DESIGN.md, Module path semantics: why Gemma-3 is not on the list)")
    return {"result": "pass", **({"notes": notes} if notes else {})}


def _rows(model) -> int:
    emb = model.get_input_embeddings()
    w = getattr(emb, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else VOCAB


def _static_checks(model) -> None:
    """What the dynamic checks cannot see: layer numbers resolve (srg/layers.py), no image/audio input,
    no index-like input validate.py does not range-check."""
    import inspect

    from djinn.srg.layers import layer_path

    _step("layers", lambda: layer_path(model, 1))
    params = list(inspect.signature(model.forward).parameters)
    media = [p for p in params if any(m in p for m in MEDIA)]
    if media:
        raise Fail("multimodal", f"forward takes {media}: image/audio inputs are not swept or range-checked")
    unchecked = [p for p in params if p not in CHECKED_INDEX_INPUTS
                 and p.endswith(("_ids", "_indices", "_index", "_idx", "_positions"))]
    if unchecked:
        raise Fail("index_inputs", f"forward takes index-like {unchecked}, which validate.py does not check")


def _window(cfg) -> str | None:
    """Local attention whose local cache drops keys: the layers a DynamicCache built from the config makes
    sliding (or chunked). GPT-Neo's local layers are a mask over a full cache, as Djinn's blocks are."""
    from transformers import DynamicCache

    layers = DynamicCache(config=cfg).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer).__name__ != "DynamicLayer"})
    if not odd:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    keys = {k: getattr(text, k) for k in WINDOW_KEYS if isinstance(getattr(text, k, None), int)}
    return f"{odd} layers ({keys})"


def _session_kv(s, rm, model, greedy):
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
        first = local_generate(model, IDS, cache=cache, **greedy)
        second = local_generate(model, torch.cat([first, MORE], 1), cache=cache, **greedy)
    except Exception as e:  # noqa: BLE001
        raise Fail("session_kv", f"the local DynamicCache continuation fails: {_err(e)}") from None
    got1 = _step("session_kv", lambda: s.generate(rm, IDS, **greedy))
    got2 = _step("session_kv", lambda: s.generate(rm, MORE, **greedy))
    if not (torch.equal(got1, first) and torch.equal(got2, second)):
        raise Fail("session_kv", f"a session's continuation differs: server {got2.tolist()} local {second.tolist()}")
    kv = s.conn.stats()["sessions"][s.sid]["kv_tokens"].get(rm.model_id)
    if kv != second.shape[1]:   # its KV lives in the session's blocks, not in a cache of the model's own
        raise Fail("session_kv", f"the session's paged KV holds {kv} tokens, not the {second.shape[1]} it has seen")
    s.call("reset_kv", {"model_id": rm.model_id})


def _length_range(rm, model) -> list[str]:
    import djinn

    notes = []
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    for total in (P - 1, P, P + 1, P + 8):
        n = total - prompt.shape[1]
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        try:
            ref, local_err = local_generate(model, prompt, **kw), None
        except Exception as e:  # noqa: BLE001
            ref, local_err = None, e
        try:
            got, err = rm.generate(prompt, **kw), None
        except Exception as e:  # noqa: BLE001
            got, err = None, e
        if local_err is None:
            if err is None and not torch.equal(got, ref):
                raise Fail("length_range", f"{total} positions: tokens differ from local")
            if err is not None and not isinstance(err, djinn.InvalidRequest):
                raise Fail("length_range", f"{total} positions (local runs): {_err(err)}")
            if err is not None:
                notes.append(f"{total} positions refused though local generates: {_err(err)}")
        elif not isinstance(err, djinn.InvalidRequest):
            what = "accepted" if err is None else _err(err)
            raise Fail("length_range", f"{total} positions fail locally ({_err(local_err)}) but the server "
                                       f"gave {what}, not InvalidRequest")
    return notes


def classes(only: set[str] | None) -> dict[str, str]:
    """class name -> the model type to build it from (the one whose config class it names)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out: dict[str, list[str]] = {}
    for mt, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        out.setdefault(name, []).append(mt)
    chosen = {}
    for name, types in out.items():
        if only and name not in only:
            continue
        pick = types[0]
        try:
            import transformers

            cc = getattr(getattr(transformers, name), "config_class", None)
            pick = next((t for t in types if t in CONFIG_MAPPING and CONFIG_MAPPING[t] is cc), pick)
        except Exception:  # noqa: BLE001 - an import failure is the build check's
            pass
        chosen[name] = pick
    return chosen


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout(f"more than {ARCH_TIMEOUT_S}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated class names")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "causal_lm_sweep.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(1)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from djinn.config import DEFAULT_ARCHITECTURES
    from djinn.frontend.connection import Connection
    from djinn.frontend.embedded import EmbeddedServer

    transformers.logging.set_verbosity_error()
    only = {s for s in args.only.split(",") if s} or None
    todo = classes(only)
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    allow = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | set(DEFAULT_ARCHITECTURES))
    cfg.write("architectures:\n" + "".join(f"  - {a}\n" for a in allow))
    cfg.close()

    def start():
        srv = EmbeddedServer("cpu", 180.0, ["--config", cfg.name])
        return srv, Connection(srv.address, secret=None)

    srv, conn = start()
    results: dict[str, object] = {}
    signal.signal(signal.SIGALRM, _alarm)
    t_all = time.perf_counter()
    for i, (name, mt) in enumerate(sorted(todo.items())):
        t0 = time.perf_counter()
        signal.alarm(ARCH_TIMEOUT_S)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                row = check_arch(conn, name, mt)
        except Fail as f:
            row = {"result": "fail", "check": f.check, "error": f.error}
        except _Timeout as e:
            row = {"result": "fail", "check": "timeout", "error": str(e)}
        except Exception as e:  # noqa: BLE001
            row = {"result": "fail", "check": "sweep", "error": _err(e) + " " + traceback.format_exc(limit=-2)[-300:]}
        finally:
            signal.alarm(0)
        if not srv.alive():
            row = {"result": "fail", "check": "server_alive", "error": f"the server died ({row})"}
            with contextlib.suppress(Exception):
                conn.close()
            srv, conn = start()
        row["model_type"] = mt
        row["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = row
        print(f"[{i + 1}/{len(todo)}] {name:40s} {row['result']:4s} {row.get('check', '')} "
              f"{row.get('error', '')[:150]} ({row['seconds']}s)", flush=True)
    conn.close()
    srv.stop()
    passed = sorted(n for n, r in results.items() if r["result"] == "pass")
    table = {
        "transformers": transformers.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
        "mapping_entries": len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), "classes_tried": len(results),
        "passed": passed, "seconds": round(time.perf_counter() - t_all, 1),
        "checks": [c for c in ("build", "decoder_only", "local", "module_path", "greedy", "sampled", "session_kv",
                               "token_range", "length_range")],
        "tiny_config": {"P": P, "sliding_window": WINDOW, **{k: v for k, v in TINY.items()}},
        "results": {n: (r if r["result"] != "pass" else {k: v for k, v in r.items()})
                    for n, r in sorted(results.items())},
    }
    if not only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    print(f"{len(passed)} of {len(results)} pass: {passed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
