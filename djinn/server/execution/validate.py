"""Index inputs of the module path, range-checked before any kernel runs (issue 15, item 2).

Note [Index inputs are checked before the device sees them]
    An index out of range in an embedding lookup (or a loss target, or a gather) is, on CUDA, a
    device-side assert: the context is poisoned for the whole process, the worker restarts, and every
    tenant loses its sessions, KV caches and paused runs to one tenant's bad token id. So every integer
    input a model uses as an index is checked on the engine thread, before forward, generate or a
    breakpoint run starts, against the tables the module holds (the rows of its embedding weights, not
    what its config says; `Limits`):
      input_ids, decoder_input_ids   0 <= id < rows of the (decoder's) input embedding
      token_type_ids                 0 <= id < rows of the token-type table (GPT-2 embeds them with wte)
      position_ids, cache_position   0 <= p, and p < the usable rows of a learned absolute position table
                                     (GPT-2 wpe; OPT embed_positions less its offset of 2) or of a fixed
                                     sin/cos table the model indexes by position (GPT-J's embed_positions
                                     buffer, CTRL's pos_encoding, n_positions rows); rotary models that compute their angles
                                     (Llama), ALiBi (BLOOM) and relative buckets (T5) have no table and
                                     no upper bound
      labels                         -100 (ignored) or 0 <= l < rows of the output embedding
      logits_to_keep (a tensor)      -seq <= i < seq
      positions a model derives      with a learned table and no position_ids: the tokens (seen + new,
                                     plus max_new_tokens for generate) fit the table, and a 2-D
                                     attention_mask holds only 0 and 1 (OPT and generate count positions
                                     with its cumsum)
      eos/pad/bos_token_id           0 <= id < the vocabulary (generate feeds pad back in as input)
      decoder_start_token_id         0 <= id < the decoder's vocabulary, from the call or the model's
                                     generation_config (an encoder-decoder's decoder is fed it first)
      input_features (Whisper)       [batch, num_mel_bins, frames] with the encoder's mel bins (conv1's
                                     input channels) and frames = 2 x max_source_positions (its stride)
                                     for forward, at most that for generate (shorter audio is zero-padded
                                     to it; more is long-form, refused); its encoder's position table is
                                     read whole, so the position limit is the decoder's table
                                     (max_target_positions: start token + max_new_tokens must fit)
    A refusal is InvalidRequest naming the input, the bad value and the allowed range; nothing ran.
    The graph path checks index ops itself, node by node (interpreter.check_indices).
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...protocol.errors import InvalidRequest
from . import executor

#: Names of learned absolute position tables (GPT-2 `wpe`, OPT `embed_positions`, BERT-style
#: `position_embeddings`); an `offset` attribute (OPT: 2) is added to every position before the lookup.
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")
#: Names of fixed sin/cos buffers a model indexes by position (GPT-J `rotary_emb.embed_positions`, CTRL
#: `pos_encoding`, both [positions, dim]): they bound positions as a learned table does.
POSITION_BUFFERS = POSITION_TABLES + ("pos_encoding",)
TOKEN_TYPE_TABLES = ("token_type_embeddings",)
IGNORE_INDEX = -100  # what HF losses skip
TOKEN_ID_KWARGS = ("eos_token_id", "pad_token_id", "bos_token_id")
#: generate's logits processors that write the scores at these ids (BART, Marian, mBART configs set them).
FORCED_ID_KWARGS = ("forced_eos_token_id", "forced_bos_token_id")


@dataclass(frozen=True)
class Limits:
    """What a module's index inputs may be; None where the module has no such table."""

    vocab: int | None          # rows of the input embedding
    decoder_vocab: int | None  # rows of the decoder's input embedding (encoder-decoder models)
    token_types: int | None    # rows of the token-type table, or of the input embedding where that embeds them
    positions: int | None      # usable rows of a learned absolute position table; None: rotary, ALiBi
    logits: int | None         # rows of the output embedding (the logits' last dim)


_LIMITS: "weakref.WeakKeyDictionary[nn.Module, Limits]" = weakref.WeakKeyDictionary()


def limits_of(module: nn.Module) -> Limits:
    """The module's Limits, read once from its tables (a model's tables never change shape)."""
    lim = _LIMITS.get(module)
    if lim is None:
        lim = _LIMITS[module] = _read_limits(module)
    return lim


def check_forward(module: nn.Module, args: list, kwargs: dict) -> None:
    """Refuse a forward whose index inputs are out of range for this module (Note [Index inputs ...])."""
    named = _bind(module, args, kwargs)
    lim = limits_of(module)
    features = executor.takes_features(module)
    if features:
        _check_features(module, named.get("input_features"), "forward")
    _check_range("input_ids", named.get("input_ids"), 0, lim.vocab)
    _check_range("decoder_input_ids", named.get("decoder_input_ids"), 0, lim.decoder_vocab)
    _check_range("token_type_ids", named.get("token_type_ids"), 0, lim.token_types)
    for name in ("position_ids", "cache_position", "decoder_position_ids"):
        _check_range(name, named.get(name), 0, lim.positions)
    _check_range("labels", named.get("labels"), 0, lim.logits, allowed=IGNORE_INDEX)
    seq = _seq_len(named)
    keep = named.get("logits_to_keep", named.get("num_logits_to_keep"))
    if isinstance(keep, torch.Tensor) and seq is not None:
        _check_range("logits_to_keep", keep, -seq, seq)
    if lim.positions is not None and named.get("position_ids") is None and not features:
        _check_implied_positions(lim.positions, seq, named.get("attention_mask"), 0)
    dec = named.get("decoder_input_ids")
    if lim.positions is not None and named.get("decoder_position_ids") is None and isinstance(dec, torch.Tensor):
        _check_implied_positions(lim.positions, int(dec.shape[-1]) if dec.dim() else None,
                                 named.get("decoder_attention_mask"), 0)


def check_generate(module: nn.Module, input_ids: Any, kwargs: dict, seen: int) -> None:
    """Refuse a generate whose token ids, special token ids or length do not fit this module. `seen`:
    the tokens the session's cache already holds (0 for a stateless generate)."""
    lim = limits_of(module)
    _check_range("input_ids", input_ids, 0, lim.vocab)
    vocab = min((n for n in (lim.vocab, lim.logits) if n is not None), default=None)
    for name in TOKEN_ID_KWARGS:
        v = kwargs.get(name)
        if not _ids_in_range(v, vocab):
            raise InvalidRequest(f"generate: {name}={v!r} is out of range: token ids must be ints in "
                                 f"[0, {vocab}) for this model")
    eff = executor.effective_kwargs(module, kwargs)
    _check_fed_back_pad(eff, vocab)
    for name in FORCED_ID_KWARGS:  # they index the scores: an id past them is a device-side assert on CUDA
        v = eff.get(name)
        if not _ids_in_range(v, lim.logits):
            raise InvalidRequest(f"generate: {name}={v!r}{'' if name in kwargs else ' (from the generation_config)'}"
                                 f" is out of range: it indexes the scores, which have {lim.logits} entries")
    if executor.is_encoder_decoder(module):
        start = eff.get("decoder_start_token_id")
        for t in (start if isinstance(start, list) else [] if start is None else [start]):
            if type(t) is not int or not 0 <= t < (lim.decoder_vocab or vocab or t + 1):
                raise InvalidRequest(f"generate: decoder_start_token_id={start!r} is out of range: the decoder is fed "
                                     f"it first, and token ids must be ints in [0, {lim.decoder_vocab}) for this model")
    features = executor.takes_features(module)
    if features:  # Note [Whisper generate]: the encoder reads its position table whole
        _check_features(module, input_ids, "generate", kwargs.get("attention_mask"))
    if lim.positions is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != (3 if features else 2):
        return
    if executor.is_encoder_decoder(module) and not features:  # the encoder reads the input, the decoder counts from its start token
        _check_implied_positions(lim.positions, int(input_ids.shape[1]), kwargs.get("attention_mask"), 0)
    prompt = executor.decoder_prompt(module, seen + int(input_ids.shape[1]))
    total = prompt + executor.new_tokens(module, prompt, kwargs)
    if total > lim.positions and executor.is_encoder_decoder(module):
        raise InvalidRequest(f"generate: the decoder's start token + {total - prompt} generated tokens = {total} "
                             f"positions, but this model's decoder has a learned position table of {lim.positions}: "
                             f"allowed range is at most {lim.positions - prompt} new tokens (max_new_tokens, or "
                             "max_length); nothing ran")
    if total > lim.positions:
        raise InvalidRequest(f"generate: {seen} cached + {int(input_ids.shape[1])} new + "
                             f"{total - prompt} generated tokens = {total} positions, but this model has a "
                             f"learned position table of {lim.positions}: allowed range is at most "
                             f"{lim.positions} positions in all; ask for fewer tokens or reset the cache")
    mask = kwargs.get("attention_mask")
    if mask is not None and not executor.is_encoder_decoder(module):
        _check_implied_positions(lim.positions, None, mask, seen)


def _check_features(module: nn.Module, x: Any, what: str, mask: Any = None) -> None:
    """Whisper's input_features (Note [Whisper generate] in executor.py): [batch, num_mel_bins, frames]
    floats, the mel bins its first convolution takes and the frames its encoder's position table covers
    (2 x max_source_positions: forward exactly, generate at most, as Whisper's generate pads short audio)."""
    if x is None and what == "forward":
        return  # encoder_outputs instead, or a call that fails in Python
    arch = type(module).__name__
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidRequest(f"{what}: input_features must be a [batch, num_mel_bins, frames] float tensor for "
                             f"{arch}, got {shape}; nothing ran")
    encoder = module.get_encoder()
    bins = int(encoder.conv1.in_channels)
    frames = int(module.config.max_source_positions) * int(encoder.conv1.stride[0]) * int(encoder.conv2.stride[0])
    b, m, n = (int(d) for d in x.shape)
    if m != bins:
        raise InvalidRequest(f"{what}: input_features has {m} mel bins, but this {arch} takes num_mel_bins={bins}; "
                             "nothing ran")
    if what == "forward" and n != frames:
        raise InvalidRequest(f"{what}: input_features has {n} frames, but this {arch}'s encoder takes exactly "
                             f"{frames} (2 x max_source_positions); pad or cut the audio to {frames} frames")
    if n < 1 or n > frames:
        raise InvalidRequest(f"{what}: input_features has {n} frames, but this {arch} generates from 1 to {frames} "
                             f"(2 x max_source_positions: shorter is zero-padded to it, as locally); long-form "
                             "audio (more frames) is not supported: generate each window separately")
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) != (b, n):
        raise InvalidRequest(f"{what}: attention_mask has shape {list(mask.shape)}; for {arch} it must be "
                             f"[batch, frames] = {[b, n]}")


def _ids_in_range(v: Any, hi: int | None) -> bool:
    """Whether a token-id argument (None, an id, or a list of ids) holds only ints in [0, hi)."""
    return all(type(t) is int and t >= 0 and (hi is None or t < hi)
               for t in (v if isinstance(v, list) else [] if v is None else [v]))


def _check_fed_back_pad(eff: dict, vocab: int | None) -> None:
    """Note [Effective generate arguments] in executor.py: the ids the model's generation_config gives
    are only compared with generated tokens, except the pad id (the first eos id when no pad is set),
    which generate feeds back as input to every row that has ended on an eos. So if an eos id can be
    generated at all (it is in the vocabulary), the pad id must be an index the embedding holds."""
    if vocab is None:
        return
    eos = eff.get("eos_token_id")
    eos_ids = [eos] if type(eos) is int else [e for e in eos if type(e) is int] if isinstance(eos, list) else []
    pad = eff.get("pad_token_id")
    if pad is None and eos_ids:
        pad = eos_ids[0]
    if pad is None or not any(0 <= e < vocab for e in eos_ids):
        return
    if type(pad) is not int or not 0 <= pad < vocab:
        raise InvalidRequest(f"generate: pad_token_id={pad!r} (from the model's generation_config, or its first "
                             f"eos_token_id) is out of range: a row that ends on an eos id is fed it as input, and "
                             f"token ids must be ints in [0, {vocab}) for this model; pass pad_token_id")


def _check_implied_positions(positions: int, seq: int | None, mask: Any, seen: int) -> None:
    """A model with a learned table and no position_ids counts positions itself: from 0 (or `seen`) by
    token, or by the cumsum of a 2-D attention mask. Both must stay inside the table."""
    if seq is not None and seen + seq > positions:
        raise InvalidRequest(f"a sequence of {seen + seq} tokens needs positions 0..{seen + seq - 1}, but this "
                             f"model's learned position table allows [0, {positions}); send at most "
                             f"{positions} tokens")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if mask.shape[1] > positions:
            raise InvalidRequest(f"attention_mask covers {mask.shape[1]} positions, but this model's learned "
                                 f"position table allows [0, {positions})")
        if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise InvalidRequest(f"attention_mask holds {bad!r}; allowed values are 0 and 1 (the model "
                                 "derives positions from it)")


def _check_range(name: str, t: Any, lo: int, hi: int | None, allowed: int | None = None) -> None:
    """Every value of t (an integer tensor) in [lo, hi) or equal to `allowed`. Other dtypes hold no index
    (float labels are class probabilities), and kernels that take indices refuse them on the host."""
    if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        return
    if t.numel() == 0:
        return
    # One reduction and one read per input: on the host for what came over the wire (ops.forward checks
    # before the copy to the device); a handle already on a GPU costs one sync.
    seen = t.masked_fill(t == allowed, lo) if allowed is not None else t
    least, most = torch.stack(torch.aminmax(seen)).tolist()
    if least < lo or (hi is not None and most >= hi):
        bad = (seen < lo) | (seen >= hi) if hi is not None else seen < lo
        value = seen[bad].flatten()[0].item()
        upper = f"{hi}" if hi is not None else "inf"
        extra = f" (or {allowed}, ignored)" if allowed is not None else ""
        raise InvalidRequest(f"{name} holds {value}, out of range: allowed range is [{lo}, {upper}){extra} "
                             f"for this model; nothing ran")


def _bind(module: nn.Module, args: list, kwargs: dict) -> dict:
    """forward's arguments by name (what **kwargs collects included). A call that does not bind fails in
    Python before any kernel, so then only the keyword arguments are checked."""
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return dict(kwargs)
    named = dict(bound)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(named.get(p.name), dict):
            named.update(named.pop(p.name))
    return named


def _seq_len(named: dict) -> int | None:
    ids, embeds = named.get("input_ids"), named.get("inputs_embeds")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return int(ids.shape[-1])
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return int(embeds.shape[-2])
    return None


def _read_limits(module: nn.Module) -> Limits:
    vocab = _rows(_call(module, "get_input_embeddings"))
    decoder = _call(module, "get_decoder")
    decoder_vocab = _rows(_call(decoder, "get_input_embeddings")) if decoder is not None else None
    token_types = positions = None
    # Whisper's encoder reads its position table whole (input_features' frames are checked instead):
    # the limit on positions is the decoder's table (Note [Whisper generate] in executor.py).
    skip = _call(module, "get_encoder") if executor.takes_features(module) else None
    inside = {id(m) for m in skip.modules()} if isinstance(skip, nn.Module) else set()
    for name, m in module.named_modules():
        if id(m) in inside:
            continue
        leaf = name.rsplit(".", 1)[-1]
        rows = _rows(m)
        if rows is None:
            continue
        if leaf in POSITION_TABLES:
            usable = rows - int(getattr(m, "offset", 0) or 0)
            positions = usable if positions is None else min(positions, usable)
        elif leaf in TOKEN_TYPE_TABLES:
            token_types = rows if token_types is None else min(token_types, rows)
    held = {id(b) for b in skip.buffers()} if isinstance(skip, nn.Module) else set()
    for name, b in module.named_buffers():  # a fixed sin/cos table indexed by position (GPT-J, CTRL)
        if name.rsplit(".", 1)[-1] in POSITION_BUFFERS and b.dim() == 2 and id(b) not in held:
            positions = int(b.shape[0]) if positions is None else min(positions, int(b.shape[0]))
    return Limits(vocab, decoder_vocab or vocab, token_types if token_types is not None else vocab, positions,
                  _rows(_call(module, "get_output_embeddings")))


def _call(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _rows(m: Any) -> int | None:
    """Rows of an embedding-like table (nn.Embedding, or the Linear of an output embedding)."""
    w = getattr(m, "weight", None)
    if isinstance(m, (nn.Embedding, nn.Linear)) and isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    return None
