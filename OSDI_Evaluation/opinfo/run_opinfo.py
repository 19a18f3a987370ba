"""The graph path against PyTorch's OpInfo database: does any op, wrapped in an nn.Module, run remotely
exactly as it runs locally? (issue 16, "Any PyTorch module, exactly")

Each OpInfo's first float32 samples (`--samples`, 3) are run through `djinn.remote(OpModule(...),
path="graph")` on a server (an embedded CPU one unless `--address`) and locally, and compared:

  pass      every output bitwise-equal to local (NaNs in the same places), same dtypes and shapes
  close     not bitwise, but within the OpInfo's own tolerance (a different kernel, e.g. a decomposition)
  wrong     a result outside tolerance, or of another shape or dtype: never acceptable
  refused   a typed Djinn error (CaptureError, InvalidRequest) whose message names the aten op
  bad       anything else: an untyped error, a typed one naming no op, a failure on the server of a
            sample that runs locally, no answer

An op's verdict is its worst sample's (wrong > bad > refused > close > pass); samples that fail locally
are not run. Writes a JSON summary (counts, per-op verdicts and the first message of each refused or bad
op) and prints the counts:

    python OSDI_Evaluation/opinfo/run_opinfo.py [--samples 3] [--ops add,mm] [--out results/opinfo.json]

The test suite runs a representative subset (tests/integration/test_opinfo.py) and the whole database
behind the `slow` marker. Needs torch's test utilities (`expecttest`, in the `test` extra).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

#: Ops whose output is uninitialized memory: only dtypes and shapes can be compared.
UNINITIALIZED = frozenset({"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"})
ORDER = ("pass", "close", "refused", "bad", "wrong")   # worse to the right
SEED = 42  # what OpInfo's wrapper_set_seed seeds its random ops with, so wrapped and plain ops agree


def op_db() -> list:
    from torch.testing._internal.common_methods_invocations import op_db as db

    return list(db)


def op_key(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


class OpModule(nn.Module):
    """One OpInfo sample as a module: the sample's tensors are the call's arguments, everything else
    (Python numbers, dtypes, slices, callables) is held here, as a forward that calls the op would."""

    def __init__(self, fn, spec, leaves: list, tensor_at: list[int]):
        super().__init__()
        self.fn, self.spec, self.leaves, self.tensor_at = fn, spec, leaves, tensor_at

    def forward(self, *tensors):
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_at, tensors):
            leaves[i] = t
        inp, args, kwargs = tree_unflatten(leaves, self.spec)
        return self.fn(inp, *args, **kwargs)


def split_sample(sample) -> tuple[list, list[int], object, list]:
    """(leaves, indices of the tensor leaves, spec, the tensors)."""
    leaves, spec = tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    return leaves, at, spec, [leaves[i] for i in at]


def _clone(ts: list) -> list:
    return [t.detach().clone() for t in ts]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_complex():
            return _same(torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj()))
        if a.dtype.is_floating_point:
            return bool(torch.equal(a, b) or ((a == b) | (a.isnan() & b.isnan())).all())
        return bool(torch.equal(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return type(a) is type(b) and a == b


def _close(a, b, op) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        try:  # torch's default tolerance for the dtype (what OpInfo tests use unless an op overrides it)
            torch.testing.assert_close(a, b, equal_nan=True, check_stride=False)
            return True
        except AssertionError:
            return False
    return _same(a, b)


def _verdict_of_error(e: BaseException, names: set[str]) -> str:
    import djinn

    msg = str(e)
    typed = isinstance(e, (djinn.CaptureError, djinn.InvalidRequest)) and not isinstance(
        e, djinn.RemoteExecutionError)
    if typed and (re.search(r"\b\w+\.\w+\.\w+\b", msg) or any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names)):
        return "refused"
    return "bad"


def run_sample(session, op, sample) -> tuple[str, str]:
    """(verdict, message) of one sample; ("skip", why) when it fails locally."""
    import djinn

    leaves, at, spec, tensors = split_sample(sample)
    fn = op.op
    try:
        torch.manual_seed(SEED)
        ref = OpModule(fn, spec, leaves, at)(*_clone(tensors))
    except Exception as e:  # the sample does not run locally: nothing to compare with
        return "skip", f"local: {type(e).__name__}: {str(e)[:200]}"
    names = {op.name, op.name.split(".")[-1], *(a.__name__ for a in op.aliases if hasattr(a, "__name__"))}
    try:
        rm = djinn.remote(OpModule(fn, spec, leaves, at), session=session, path="graph")
        out = rm(*_clone(tensors), seed=SEED)
        got = tree_map(lambda v: v.cpu() if isinstance(v, djinn.RemoteTensor) else v, out)
    except Exception as e:
        return _verdict_of_error(e, names), f"{type(e).__name__}: {str(e)[:400]}"
    ref_l, ref_spec = tree_flatten(ref)
    got_l, got_spec = tree_flatten(got)
    if len(ref_l) != len(got_l):
        return "wrong", f"{len(got_l)} outputs, local has {len(ref_l)}"
    if op.name in UNINITIALIZED:
        got_l = [torch.zeros_like(g) if isinstance(g, torch.Tensor) else g for g in got_l]
        ref_l = [torch.zeros_like(r) if isinstance(r, torch.Tensor) else r for r in ref_l]
    if all(_same(g, r) for g, r in zip(got_l, ref_l)):
        return "pass", ""
    if all(_close(g, r, op) for g, r in zip(got_l, ref_l)):
        diff = max((float((g.double() - r.double()).abs().nan_to_num().max()) for g, r in zip(got_l, ref_l)
                    if isinstance(g, torch.Tensor) and g.numel() and not g.is_complex()
                    and g.dtype.is_floating_point), default=0.0)
        return "close", f"max abs diff {diff:.3g}"
    detail = "; ".join(f"out {k}: {_describe(g, r)}" for k, (g, r) in enumerate(zip(got_l, ref_l))
                       if not _close(g, r, op))
    return "wrong", detail[:400]


def _describe(g, r) -> str:
    if isinstance(g, torch.Tensor) and isinstance(r, torch.Tensor):
        if g.dtype != r.dtype or g.shape != r.shape:
            return f"got {g.dtype}{list(g.shape)}, local {r.dtype}{list(r.shape)}"
        return f"max abs diff {float((g.double() - r.double()).abs().nan_to_num().max()):.3g}"
    return f"got {g!r}, local {r!r}"


def run_op(session, op, n_samples: int) -> dict:
    t0 = time.perf_counter()
    try:
        samples = list(itertools.islice(op.sample_inputs("cpu", torch.float32, requires_grad=False), n_samples))
    except Exception as e:
        return {"verdict": "skip", "message": f"samples: {type(e).__name__}: {e}"[:300], "samples": []}
    results = [run_sample(session, op, s) for s in samples]
    ran = [(v, m) for v, m in results if v != "skip"]
    if not ran:
        return {"verdict": "skip", "message": results[0][1] if results else "no samples", "samples": []}
    verdict = max((v for v, _ in ran), key=ORDER.index)
    message = next((m for v, m in ran if v == verdict), "")
    return {"verdict": verdict, "message": message, "samples": [v for v, _ in results],
            "seconds": round(time.perf_counter() - t0, 3)}


class _WriteAudit:
    """Note [Unannotated writes] in srg/ops.py, checked: runs code on real CPU tensors and, around every
    aten op the graph path allows, compares each tensor argument before and after; a changed argument the
    op's schema (and UNANNOTATED_WRITES) does not name is recorded as (op, argument)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from djinn.srg import ops as srg_ops

        found = self.found = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if str(func) not in srg_ops.ALLOWED:
                    return func(*args, **kwargs)
                declared = {pos for pos, _ in srg_ops.written_args(func, args, kwargs)}
                names = [a.name for a in func._schema.arguments]
                before = {}
                for pos, v in list(enumerate(args)) + [(names.index(k), v) for k, v in kwargs.items() if k in names]:
                    if isinstance(v, torch.Tensor) and v.layout == torch.strided and pos not in declared:
                        before[pos] = (v, v.detach().clone())
                out = func(*args, **kwargs)
                for pos, (v, old) in before.items():
                    if not _same(v.detach(), old):
                        found.add((str(func), names[pos]))
                return out

        self.mode = Mode()


def audit_writes(op, n_samples: int = 3) -> set:
    """(op, argument) pairs an OpInfo's samples write without their schema saying so (see _WriteAudit)."""
    audit = _WriteAudit()
    for sample in itertools.islice(op.sample_inputs("cpu", torch.float32, requires_grad=False), n_samples):
        leaves, at, spec, tensors = split_sample(sample)
        try:
            with torch.no_grad(), audit.mode:
                torch.manual_seed(SEED)
                OpModule(op.op, spec, leaves, at)(*_clone(tensors))
        except Exception:
            continue
    return audit.found


def float32_ops(names: list[str] | None = None) -> list:
    ops = [op for op in op_db() if torch.float32 in op.supported_dtypes("cpu")]
    if names:
        want = set(names)
        ops = [op for op in ops if op_key(op) in want or op.name in want]
    return ops


def run(session, ops: list, n_samples: int = 3, progress: bool = False) -> dict:
    per_op: dict[str, dict] = {}
    for op in ops:
        per_op[op_key(op)] = r = run_op(session, op, n_samples)
        if progress and r["verdict"] not in ("pass", "skip"):
            print(f"{op_key(op):40s} {r['verdict']:8s} {r['message'][:150]}", flush=True)
    counts = {v: sum(1 for r in per_op.values() if r["verdict"] == v) for v in ORDER + ("skip",)}
    tried = sum(counts[v] for v in ORDER)
    return {"counts": counts, "tried": tried,
            "pass_rate": round((counts["pass"] + counts["close"]) / max(tried, 1), 4), "ops": per_op}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--ops", default="", help="comma-separated OpInfo names (default: every float32 op)")
    p.add_argument("--address", default=None, help="a running server (default: an embedded CPU server)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "opinfo.json"))
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import djinn
    from common import environment

    conn = djinn.connect(a.address, **({} if a.address else {"device": "cpu"}))
    session = conn.default_session()
    ops = float32_ops([s for s in a.ops.split(",") if s] or None)
    t0 = time.perf_counter()
    summary = run(session, ops, a.samples, progress=True)
    summary.update(samples_per_op=a.samples, seconds=round(time.perf_counter() - t0, 1),
                   env=environment(torch.device("cpu")))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=1, sort_keys=True))
    c = summary["counts"]
    print(f"{summary['tried']} ops tried: " + ", ".join(f"{c[v]} {v}" for v in ORDER)
          + f"; {c['skip']} skipped (no sample runs locally); {100 * summary['pass_rate']:.1f}% pass "
          f"({summary['seconds']} s) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
