"""Module-path execution: forward and server-side generate on models built by the registry.

Runs on the engine thread only. Outputs stay on the device; the engine turns tensors into handles.

Note [Effective generate arguments]
    transformers' generate reads every argument a call leaves out from the model's generation_config,
    which a client sends at registration, a server-side model reads from its generation_config.json,
    and transformers fills from the model's config itself. Checked on the kwargs alone, that config
    was a way around every check: num_beams=4096 in a generation_config ran 4096 beams. So the
    allow-list and the ranges apply to the merged values (`effective_kwargs`, `check_generate`): a
    config field generate() does not accept must be unset (None, False, its default, or inert
    metadata), and an allowed one must be in range; the index checks read the merged token ids
    (validate.check_generate). A call may still override a config value with an allowed one
    (num_beams=1), as locally.

Note [Encoder-decoder generate]
    An encoder-decoder model (T5) generates on the module path like a decoder-only one, with two
    differences. Its cache is transformers' `EncoderDecoderCache` of a `PagedCache` (the decoder's
    self-attention KV, in the model's blocks, one block layer per decoder layer: `KVShape.of_module`)
    and a `DynamicCache` for the cross-attention KV, which every decoder step reads unchanged: the
    encoder's keys and values, computed once per call. Those are the call's own tensors (Stack), not
    blocks: they are fixed once computed and no session keeps them, so the quota check counts them on
    top of the blocks (`cross_kv_bytes`: the encoder's tokens x the decoder's per-token KV bytes).
    `DynamicCache` would return exactly these tensors too, so greedy tokens and scores stay bitwise
    the local `generate`'s. And a call does not continue a session's KV: its input_ids are the
    encoder's input, and the decoder starts again from `decoder_start_token_id` (locally, a second
    generate over the same cache would cross-attend to the first call's encoder states), so
    `s.generate` on an encoder-decoder model is a fresh generate, as `rm.generate` is, and the session
    keeps no KV for it. Its decoder starts from one token whatever the encoder reads
    (`decoder_prompt`), which is what the blocks, the length limits and max_length count; prefix
    sharing, keyed by prompt token ids, is off for it (those ids are the encoder's, not the KV's).

Note [Whisper generate]
    Whisper's encoder reads `input_features` (float [batch, num_mel_bins, frames], `main_input_name`)
    instead of token ids, so generate's input is that tensor (`check_generate`), what it feeds at once
    and its cross-attention KV count the encoder's max_source_positions per row (`fed_tokens`), and
    the decoder's learned table (max_target_positions) is the position limit (validate.py). Its
    generate is its own (WhisperGenerationMixin): it builds the decoder's start tokens, suppress-token
    processors and max_length from the generation_config, then calls the common generate once for
    short-form audio (frames <= 2 x max_source_positions; shorter input is zero-padded to that, as
    locally). Djinn runs that same method over the paged cache, so the tokens are bitwise the local
    ones, for what keeps the decoder's start at one token and one generate call: decoder_start_token_id,
    suppress_tokens and begin_suppress_tokens (lists of ids, compared with torch.isin: any int is safe),
    and greedy or sampled decoding. Whisper samples iff `temperature` > 0 (do_sample is ignored), so the
    score check follows that (`whisper_sampling`). max_length counts from the start token there: the
    call generates min(max_length + 1, max_target_positions) - 1 tokens (`new_tokens`). Refused, with
    InvalidRequest naming the argument or the generation_config field, before anything runs: what
    adds start tokens or runs other forwards (language, task, language detection through lang_to_id,
    forced_decoder_ids, no_timestamps_token_id, prompt_ids), timestamps (return_timestamps,
    return_token_timestamps), temperature fallback and its thresholds, and long-form audio.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ...protocol.errors import InvalidRequest
from ..sessions import KVState
from . import steering
from .sampling import checked_hf_kwargs

# transformers >= 5.2x renames generate's past_key_values to cache; the old name works (with this
# warning) on every version we support, the new one only on recent ones.
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)

#: generate() keyword arguments a client may pass. Everything else is refused, so a client cannot
#: hand the server callables, custom logits processors or assistant models.
GENERATE_KWARGS = {
    "max_new_tokens", "min_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
    "eos_token_id", "pad_token_id", "bos_token_id", "attention_mask", "length_penalty",
    "num_return_sequences", "use_cache", "decoder_start_token_id", "forced_eos_token_id", "forced_bos_token_id",
}

#: Extra generate() arguments of a model whose encoder reads input_features (Note [Whisper generate]).
WHISPER_KWARGS = frozenset({"suppress_tokens", "begin_suppress_tokens"})

#: WhisperGenerationMixin.generate's own arguments and generation_config fields that add decoder start
#: tokens, run other forwards, return timestamps or decode long-form audio: refused when set.
WHISPER_REFUSED = (
    "return_timestamps", "return_token_timestamps", "return_segments", "language", "task", "is_multilingual",
    "lang_to_id", "forced_decoder_ids", "no_timestamps_token_id", "prompt_ids", "prompt_condition_type",
    "condition_on_prev_tokens", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold",
    "num_segment_frames", "time_precision", "time_precision_features", "return_dict_in_generate",
    "force_unique_generate_call", "monitor_progress", "decoder_input_ids", "encoder_outputs",
)


def is_encoder_decoder(module: torch.nn.Module | None) -> bool:
    return bool(getattr(getattr(module, "config", None), "is_encoder_decoder", False))


def takes_features(module: torch.nn.Module | None) -> bool:
    """Whether the model is a Whisper whose encoder reads input_features rather than token ids (Note
    [Whisper generate]). Other speech models' encoders and generates differ: they are not covered."""
    return (getattr(module, "main_input_name", "input_ids") == "input_features"
            and any(c.__name__ == "WhisperGenerationMixin" for c in type(module).__mro__))


def fed_tokens(module: torch.nn.Module | None, x: Any) -> int | None:
    """Positions an input feeds at once (batch x tokens); for input_features (Note [Whisper generate])
    batch x the encoder's max_source_positions, what its layers run over whatever the frames."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return None
    if takes_features(module) and x.dim() == 3:
        return int(x.shape[0]) * int(module.config.max_source_positions)
    return x.numel() if x.dim() <= 2 else int(x.shape[0]) * int(x.shape[1])


def empty_ids(x: torch.Tensor) -> torch.Tensor:
    """[batch, 0] token ids on x's device: a fresh KVState's (x may be input_features)."""
    return torch.zeros((int(x.shape[0]), 0), dtype=torch.long, device=x.device)


def decoder_prompt(module: torch.nn.Module, fed: int) -> int:
    """The tokens a generate's KV holds before it generates: the `fed` prompt tokens (the session's and
    the call's), or for an encoder-decoder model the decoder's one start token (Note [Encoder-decoder
    generate]). What max_length, the KV blocks and the position limits count from."""
    return 1 if is_encoder_decoder(module) else fed


def cross_kv_bytes(module: torch.nn.Module, shape, input_ids: torch.Tensor) -> int:
    """Bytes of an encoder-decoder generate's cross-attention KV (0 for a decoder-only model): every
    decoder layer's keys and values of each encoder token (Note [Encoder-decoder generate])."""
    if not is_encoder_decoder(module):
        return 0
    return (fed_tokens(module, input_ids) or 0) * shape.token_bytes


def model_cache(module: torch.nn.Module, cache):
    """The cache object generate passes to `module`: the paged cache itself, or for an encoder-decoder
    model the paged cache as its self-attention cache (Note [Encoder-decoder generate])."""
    if not is_encoder_decoder(module):
        return cache
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(cache, DynamicCache())


def forward(module: torch.nn.Module, args: list, kwargs: dict) -> Any:
    kwargs = dict(kwargs)
    # A cache object cannot be returned to the client; forward calls are stateless unless asked.
    if _accepts(module, "use_cache"):
        kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        return module(*args, **kwargs)


def generate(module: torch.nn.Module, state: KVState | None, input_ids: torch.Tensor, kwargs: dict,
             on_tokens: Callable[[torch.Tensor], None] | None,
             step_hook: Callable[[], None] | None = None, continues: bool = True,
             steer: dict[int, torch.Tensor] | None = None,
             record: dict[int, list] | None = None) -> torch.Tensor:
    """Run HF generate on the server over `state`'s KV blocks (None: HF's own cache, graph models only).

    With `continues`, `input_ids` are the tokens that follow what the state has seen (a session's
    KV); the result is the whole sequence so far, exactly what one long generate call over the
    concatenation returns. `steer` adds vectors to decoder layers' outputs (Note [Steering] in
    steering.py); `record` gets each named layer's output at every fed position appended, row 0's
    (Note [Recorded activations]). A state whose KV the scheduler dropped (recompute policy) has an empty
    table and its token ids: generate prefills them all again. The caller reserved the blocks for
    every token this call may add (dispatch admission). `step_hook` is called after every step.
    It samples from torch's global generators: the caller has put the call's own stream there, seeded
    or fresh (Note [Random streams] in rng.py).
    """
    check_generate(input_ids, kwargs, module)
    kwargs = dict(kwargs)
    streamer = _TokenStreamer(on_tokens) if on_tokens is not None else None
    if state is not None:
        if state.ids.shape[0] != input_ids.shape[0]:
            raise InvalidRequest(f"session cache has batch {state.ids.shape[0]}, input has {input_ids.shape[0]}")
        if continues and is_encoder_decoder(module):  # the callers make it a fresh generate
            raise InvalidRequest("an encoder-decoder model's generate does not continue a KV cache "
                                 "(Note [Encoder-decoder generate])")
        if continues:
            input_ids = torch.cat([state.ids, input_ids], dim=1)
            if "attention_mask" in kwargs:
                raise InvalidRequest("attention_mask is not supported when continuing a session's cache")
        kwargs["past_key_values"] = model_cache(module, state.cache)
    if step_hook is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StepCriterion(step_hook)])
    gc = module.generation_config
    sampling = kwargs.get("do_sample")
    if sampling is None:
        sampling = getattr(gc, "do_sample", False)
    if takes_features(module):
        sampling = whisper_sampling(kwargs)
    if sampling:
        kwargs = checked_hf_kwargs(kwargs, gc)  # Note [Scores are checked before sampling]
    before = state.table.length if state is not None else 0
    try:
        recorders = {k: (lambda h, got=got: got.append(h[0].detach().clone())) for k, got in (record or {}).items()}
        with torch.no_grad(), steering.active(steer, recorders):  # hooks installed by steering.parse
            out = module.generate(input_ids, streamer=streamer, **kwargs)
    except BaseException:
        if state is not None:
            # Positions from `before` on belong to a sequence that did not happen: the KV of the tokens
            # the state has seen is untouched (writes go to later positions only), so it goes on from there.
            state.cache.abort_forward()
            state.table.length = before
        raise
    if state is not None:
        state.ids = out
    return out


# Integer arguments and their ranges. They size the scheduler's memory estimate (`new_tokens`), so a
# negative or absurd value must be refused here: a negative one once made every schedule fail.
MAX_GENERATE_TOKENS = 1 << 20
_INT_RANGES = {
    "max_new_tokens": (0, MAX_GENERATE_TOKENS), "min_new_tokens": (0, MAX_GENERATE_TOKENS),
    "max_length": (1, MAX_GENERATE_TOKENS), "num_beams": (1, 64), "num_return_sequences": (1, 64),
    "top_k": (0, 1 << 24), "no_repeat_ngram_size": (0, 1 << 16), "min_length": (0, MAX_GENERATE_TOKENS),
}


#: generation_config fields a client may not pass to generate but that change nothing the server
#: bounds: metadata, and knobs that only end a call sooner or apply to beams (refused anyway).
_INERT_CONFIG = frozenset({"transformers_version", "_from_model_config", "max_time", "early_stopping", "min_length"})


def effective_kwargs(module: torch.nn.Module | None, kwargs: dict) -> dict:
    """generate's arguments as transformers will use them: the call's kwargs over the model's
    generation_config (Note [Effective generate arguments])."""
    gc = getattr(module, "generation_config", None) if module is not None else None
    config = gc.to_dict() if gc is not None and hasattr(gc, "to_dict") else {}
    return {**config, **kwargs}


def check_generate(input_ids: Any, kwargs: dict, module: torch.nn.Module | None = None) -> None:
    """Refuse a generate whose arguments are off the allow-list or out of range, as they take effect:
    the call's kwargs over `module`'s generation_config (Note [Effective generate arguments])."""
    whisper = takes_features(module)  # Note [Whisper generate]
    allowed = GENERATE_KWARGS | WHISPER_KWARGS if whisper else GENERATE_KWARGS
    bad = sorted(set(kwargs) - allowed)
    if bad:
        refused = [n for n in bad if n in WHISPER_REFUSED] if whisper else []
        if refused:
            raise InvalidRequest(f"generate: {refused[0]} is not supported for {type(module).__name__} on the server "
                                 "(timestamps, language and task, prompts, decoder_input_ids and long-form audio are "
                                 "not; short-form greedy and sampled generate are: Note [Whisper generate])")
        raise InvalidRequest(f"generate does not accept {bad}; allowed: {sorted(allowed)}")
    if whisper:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 3 or not input_ids.is_floating_point():
            raise InvalidRequest(f"generate on {type(module).__name__} needs input_features as a [batch, num_mel_bins, "
                                 "frames] float tensor")
    elif not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InvalidRequest("generate needs input_ids as a [batch, tokens] int64 tensor")
    eff = effective_kwargs(module, kwargs)

    def where(name: str) -> str:
        if name in kwargs:
            return ""
        return " (from the model's generation_config" + ("; pass it to override)" if name in GENERATE_KWARGS else ")")

    if module is not None:
        defaults = _config_defaults()
        if whisper:
            _check_whisper(module, eff, where)
        for name, v in eff.items():
            if name in allowed or name in _INERT_CONFIG or name not in defaults:
                continue  # unknown names are attributes transformers never reads (Whisper's: _check_whisper)
            if not (v is None or v is False or v == defaults[name] or (isinstance(v, (list, dict)) and not v)
                    or (name == "cache_implementation" and v == "hybrid")):  # transformers unsets "hybrid" itself
                raise InvalidRequest(f"generate: the model's generation_config sets {name}={v!r}, which generate "
                                     f"does not accept (allowed: {sorted(GENERATE_KWARGS)}); register the model "
                                     "without it")
    for name, (lo, hi) in _INT_RANGES.items():
        v = eff.get(name)
        if v is not None and (type(v) is not int or not lo <= v <= hi):
            raise InvalidRequest(f"generate: {name} must be an int in [{lo}, {hi}], got {v!r}{where(name)}")
    for name in ("num_beams", "num_return_sequences"):  # they copy and reorder cache rows (PagedLayer)
        if (eff.get(name) or 1) > 1:
            raise InvalidRequest(f"generate: {name} > 1 is not supported over paged KV blocks yet; send one "
                                 f"generate per sequence (a batch of input rows works){where(name)}")


def _check_whisper(module: torch.nn.Module, eff: dict, where: Callable[[str], str]) -> None:
    """Note [Whisper generate]: what Whisper's own generate reads, refused where set; the suppress lists
    and temperature checked for type (a list of temperatures is the fallback loop)."""
    arch = type(module).__name__
    for name in WHISPER_REFUSED:
        v = eff.get(name)
        if name in eff and (name == "lang_to_id" or not (v is None or v is False or v == "first-segment")):
            raise InvalidRequest(f"generate: {name}={v!r}{where(name)} is not supported for {arch} on the server: "
                                 "it adds decoder start tokens, runs other forwards, returns timestamps or decodes "
                                 "long-form audio (Note [Whisper generate]); register the model without it")
    if getattr(module.config, "forced_decoder_ids", None) is not None:
        raise InvalidRequest(f"generate: the model's config sets forced_decoder_ids, which is not supported for {arch} "
                             "on the server (Note [Whisper generate]); register the model without it")
    for name in WHISPER_KWARGS:
        v = eff.get(name)
        if v is not None and not (isinstance(v, list) and all(type(t) is int for t in v)):
            raise InvalidRequest(f"generate: {name} must be a list of token ids (ints), got {v!r}{where(name)}")
    t = eff.get("temperature")
    if t is not None and (type(t) not in (int, float)):
        raise InvalidRequest(f"generate: temperature must be a number for {arch} (a list of temperatures, Whisper's "
                             f"fallback, is not supported), got {t!r}{where('temperature')}")


def whisper_sampling(kwargs: dict) -> bool:
    """Whether Whisper's generate samples: iff the call's temperature is > 0 (Note [Whisper generate])."""
    t = kwargs.get("temperature")
    return type(t) in (int, float) and t > 0


_DEFAULTS: dict | None = None


def _config_defaults() -> dict:
    global _DEFAULTS
    if _DEFAULTS is None:
        from transformers import GenerationConfig

        _DEFAULTS = GenerationConfig().to_dict()
    return _DEFAULTS


def new_tokens(module: torch.nn.Module, prompt_tokens: int, kwargs: dict) -> int:
    """Most tokens a generate call may add (for the scheduler's memory estimate)."""
    if takes_features(module):  # Note [Whisper generate]: max_length counts from the start token, capped
        gc = module.generation_config
        most = kwargs.get("max_new_tokens")
        most = gc.max_new_tokens if most is None else most
        if most is not None:
            return int(most)
        length = kwargs.get("max_length") or gc.max_length or 20
        return max(0, min(int(length) + prompt_tokens, int(module.config.max_target_positions)) - prompt_tokens)
    if kwargs.get("max_new_tokens") is not None:
        return int(kwargs["max_new_tokens"])
    gc = getattr(module, "generation_config", None)
    if kwargs.get("max_length") is not None:
        return max(0, int(kwargs["max_length"]) - prompt_tokens)
    if gc is not None and gc.max_new_tokens is not None:
        return int(gc.max_new_tokens)
    return max(0, int(getattr(gc, "max_length", 20) or 20) - prompt_tokens)


class _StepCriterion(StoppingCriteria):
    """A stopping criterion that stops nothing: it hands the device back to the engine between steps."""

    def __init__(self, hook: Callable[[], None]):
        self.hook = hook

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.hook()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _TokenStreamer:
    """HF streamer protocol: put() gets the prompt first, then each step's new tokens."""

    def __init__(self, on_tokens: Callable[[torch.Tensor], None]):
        self.on_tokens = on_tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_tokens(value.reshape(-1))

    def end(self) -> None:
        pass


def _accepts(module: torch.nn.Module, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
