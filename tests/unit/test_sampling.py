"""Tier 1: scores are checked before sampling (Note [Scores are checked before sampling] in
djinn/server/execution/sampling.py), and the check leaves HF generate's tokens bitwise as they were."""
from __future__ import annotations

import re

import pytest
import torch

from djinn.protocol.errors import InvalidRequest
from djinn.server.execution.fastpath import Sampler
from djinn.server.execution.sampling import check_scores, checked_hf_kwargs

from ..models import tiny_llama

INF, NAN = float("inf"), float("nan")


def test_finite_rows_pass_and_rows_without_a_finite_maximum_are_refused():
    check_scores(torch.tensor([[0.0, 1.0, -INF], [-1e30, 3.0, 2.0]]))
    for bad, rows in [([[0.0, NAN, 1.0]], [0]), ([[0.0, 1.0, 2.0], [1.0, INF, 0.0]], [1]),
                      ([[-INF, -INF], [0.0, 0.0], [-INF, -INF]], [0, 2])]:
        with pytest.raises(InvalidRequest, match=re.escape(f"row(s) {rows} ")):
            check_scores(torch.tensor(bad))


@pytest.mark.parametrize("kw", [dict(top_k=20), dict(temperature=0.7, top_k=20, top_p=0.9),
                                dict(temperature=1.3, min_p=0.05), dict(temperature=0.5, typical_p=0.8),
                                dict(temperature=0.6, repetition_penalty=1.2)])
def test_the_checked_kwargs_sample_bitwise_what_hf_samples(kw):
    model = tiny_llama(seed=2)
    ids = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 64]])
    kw = dict(kw, max_new_tokens=24, do_sample=True)
    torch.manual_seed(3)
    want = model.generate(ids, **kw)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, **checked_hf_kwargs(kw, model.generation_config)), want)


def test_the_model_generation_configs_temperature_is_the_one_checked():
    model = tiny_llama(seed=2)
    model.generation_config.temperature = 1e-40
    kw = checked_hf_kwargs({"do_sample": True}, model.generation_config)
    assert kw["temperature"] == 1.0  # HF adds no warper of its own: the checked one is the only one
    with pytest.raises(InvalidRequest, match="sampling refused"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, **kw)


@pytest.mark.parametrize("temperature", [1e-40, 0.0, -1.0, NAN])
def test_a_temperature_that_breaks_the_scores_is_invalid_request(temperature):
    model = tiny_llama(seed=2)
    with pytest.raises(InvalidRequest):  # HF: a ValueError, or on the CPU multinomial's RuntimeError
        kw = checked_hf_kwargs({"do_sample": True, "temperature": temperature}, model.generation_config)
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, **kw)


def test_the_fast_path_sampler_checks_after_its_filters():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(InvalidRequest):
        Sampler(True, top_k=2, generator=g)(torch.tensor([[0.0, NAN, 1.0]]))
    with pytest.raises(InvalidRequest):
        Sampler(True, temperature=1.0, generator=g)(torch.tensor([[-INF, -INF]]))
    with pytest.raises(InvalidRequest):
        Sampler(True, temperature=1e-5, generator=g)(torch.tensor([[3e38, 0.0]]))  # overflows to inf
    assert Sampler(True, top_k=1, generator=g)(torch.tensor([[0.0, -INF, 2.0]])).tolist() == [2]
