"""exp2's argument parsing and planning run without a GPU (the measurement itself needs one)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from djinn.vmu.planner import spread

PATH = Path(__file__).resolve().parents[2] / "OSDI_Evaluation" / "exp2_virtual_memory" / "run_exp2.py"


@pytest.fixture(scope="module")
def exp2():
    spec = importlib.util.spec_from_file_location("run_exp2", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_exp2"] = mod  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("run_exp2", None)


def test_defaults_are_the_issue_settings(exp2):
    a = exp2.parse_args([])
    assert (a.layers, a.prompt, a.new_tokens, a.accelerate_new_tokens) == (40, 512, 64, 8)
    assert a.budgets == [8.0, 12.0, 16.0, 20.0] and a.headline == 12.0 and a.accelerate_budgets == a.budgets
    assert a.systems == ["resident", "djinn", "accelerate", "accelerate_pinned"] and a.slots == 2


def test_fewer_layers_scale_the_budgets(exp2):
    a = exp2.parse_args(["--layers", "8"])
    assert a.budgets == [2.088, 2.888, 3.688, 4.488] and a.headline == 2.888
    rows = exp2.plan_table(8, a.budgets)
    assert [r["streamed_layers"] for r in rows] == [8, 7, 5, 4]  # the quick check streams at every budget
    a = exp2.parse_args(["--layers", "8", "--budgets", "3,4", "--systems", "djinn", "--accelerate-budgets", "4"])
    assert (a.budgets, a.systems, a.accelerate_budgets) == ([3.0, 4.0], ["djinn"], [4.0])


@pytest.mark.parametrize("argv", [["--systems", "djinn,vllm"], ["--budgets", "0"], ["--budgets", "x"],
                                  ["--layers", "0"], ["--new-tokens", "1"]])
def test_bad_arguments_exit(exp2, argv):
    with pytest.raises(SystemExit):
        exp2.parse_args(argv)


def test_model_bytes_matches_the_meta_model(exp2):
    spec = exp2.spec_of(exp2.llama13b_config(4))
    assert sum(spec.nbytes(n) for n in spec.shapes) == exp2.model_bytes(4)
    assert exp2.model_bytes(40) == 26_031_729_152  # 26.0 GB, as in BASELINES.md


def test_plan_table_at_the_exp2_budgets(exp2):
    rows = exp2.plan_table(40, [8, 12, 16, 20])
    assert [(r["resident_layers"], r["streamed_layers"]) for r in rows] == [(10, 30), (17, 23), (24, 16), (30, 10)]
    r12 = rows[1]
    assert r12["ring_bytes"] == 1_268_817_920 and r12["gpu_bytes"] <= 12 * 2**30
    assert r12["streamed_bytes_per_forward"] == 23 * 634_408_960  # 14.59 GB per token
    assert exp2.plan_table(40, [40])[0]["streamed_layers"] == 0
    assert spread(40, 17)[:3] == (1, 3, 5)
