"""Scores are checked before anything samples from them (every sampling path: HF generate, the decode
fast path).

Note [Scores are checked before sampling]
    `torch.multinomial` over probabilities holding NaN or inf (or summing to zero) is, on CUDA, a
    device-side assert: the context is lost for the whole process, the worker restarts, and every tenant
    loses its sessions to one tenant's request. One tenant can get there alone: a steering edit that
    writes NaN into an activation, weights holding NaN or inf, a temperature so small that the scores
    overflow. So the scores a sampler is about to soften are checked first, after every step that may
    make them non-finite (`checked_hf_kwargs` says where that is in HF generate): a row is fine when its
    maximum is finite (max propagates NaN, and a row of -inf or one holding +inf has no finite
    maximum); then softmax gives finite probabilities with a positive sum. Otherwise the request fails
    with InvalidRequest, before multinomial, and only that request: the check costs one reduction and
    one device sync per step, which HF generate's stopping checks already pay.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from ...protocol.errors import InvalidRequest


def finite_rows(scores: torch.Tensor) -> torch.Tensor:
    """[rows] bool, on the device: which rows of scores [rows, vocab] hold a distribution to sample from
    (Note [Scores are checked before sampling])."""
    return torch.isfinite(scores.amax(-1))


def refused(rows: list[int]) -> InvalidRequest:
    """The error of a sampling whose rows `rows` hold no distribution."""
    return InvalidRequest(
        f"sampling refused: the scores of row(s) {rows[:8]} hold NaN or +inf, or no finite value, so "
        "there is no distribution to sample from (logits that are not finite, e.g. from an edit that "
        "wrote NaN or inf into an activation, or a temperature so small that the scores overflow)")


def check_scores(scores: torch.Tensor) -> None:
    """Note [Scores are checked before sampling]: scores [rows, vocab], as softmax will see them."""
    ok = finite_rows(scores)  # [rows]
    if not bool(ok.all()):
        raise refused((~ok).nonzero().flatten().tolist())


class FiniteScores(LogitsProcessor):
    """The check as a logits processor of HF generate."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return scores


def checked_hf_kwargs(kwargs: dict, generation_config: Any) -> dict:
    """HF generate's kwargs for a sampling call, with the check in place.

    HF runs the logits processors a caller passes after its own processors (repetition penalty, ...)
    but before its sampling warpers (temperature, then top-k, top-p, min-p, typical-p). Of those only
    temperature can make finite scores non-finite (a division that overflows); the others only mask
    tokens to -inf and keep at least one finite score. So temperature is applied here, by HF's own
    warper, where HF would apply it (first of the warpers: the same op on the same scores, so the
    tokens stay bitwise HF's), HF is told 1.0, and the check sees the scores after it.
    """
    temperature = kwargs.get("temperature")
    if temperature is None:
        temperature = getattr(generation_config, "temperature", None)
    processors = []
    if temperature is not None and temperature != 1.0:  # HF's own condition for adding the warper
        try:
            processors.append(TemperatureLogitsWarper(temperature))
        except ValueError as e:  # not a positive float
            raise InvalidRequest(f"generate: {e}") from None
        kwargs = dict(kwargs, temperature=1.0)
    processors.append(FiniteScores())
    return dict(kwargs, logits_processor=LogitsProcessorList(processors))
