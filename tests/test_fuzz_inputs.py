"""Property-based fuzzing of every input boundary (the table in ``tests/fuzz_boundaries.py``).

Each case writes a valid input, lets hypothesis damage it (truncated, mutated bytes, wrong types,
NaN / inf, empty, huge values, duplicate ids, ...), and checks:

- the library's reader returns, or raises one of the project's input errors with a one-line message;
- the ``incremental`` command ends with exit 0, or with exit 2 (3 for a diverged training) and one line
  on stderr having written nothing; a reader's refusal is always exit 2; never a traceback;
- the input files are unchanged.

The fast profile (default test run) tries a few cases per boundary with a fixed seed; the slow
profile (``-m slow``) tries ``Boundary.slow_examples`` random cases per boundary, at least 10,000 in
all (``INCREMENTAL_FUZZ_SCALE=0.1`` tries a tenth of them, ``=10`` ten times as many).
``INCREMENTAL_FUZZ_REPORT=FILE`` writes the number of cases per boundary and outcome as JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzz_boundaries import BOUNDARIES, INPUT_ERRORS, Boundary, assets
from .reliability_helpers import run_main, snapshot

FAST_EXAMPLES = 8
COMMON = dict(deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
OUTCOMES: dict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("INCREMENTAL_FUZZ_REPORT")
    if path:
        total = sum(sum(c.values()) for c in OUTCOMES.values()) // 2  # every case counts a reader and a command outcome
        Path(path).write_text(json.dumps({"cases": total, "by_boundary": OUTCOMES}, indent=2, sort_keys=True) + "\n")


def fuzz_case(boundary: Boundary, data: st.DataObject) -> None:
    shared = assets()
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{boundary.name}-") as tmp:
        case = Path(tmp) / "case"
        case.mkdir()
        path = boundary.seed(case, shared)
        boundary.mutate(data, path)
        inputs = snapshot(case, shared.root)
        try:
            boundary.load(path, shared)
        except INPUT_ERRORS as exc:
            assert "\n" not in str(exc).strip(), f"{boundary.name}: a multi-line error: {exc}"
            refused = True
        else:
            refused = False
        OUTCOMES[boundary.name]["reader_refused" if refused else "reader_loaded"] += 1
        assert snapshot(case, shared.root) == inputs, f"{boundary.name}: the reader changed its input"
        if boundary.cli is None or not (refused or boundary.cli_when_loaded):
            OUTCOMES[boundary.name]["command_not_run"] += 1
            return
        out = Path(tmp) / "out"
        listing = sorted(p.name for p in Path(tmp).iterdir())
        code, _, err = run_main(boundary.cli(path, out, shared))
        err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("deprecated: "))  # notices
        OUTCOMES[boundary.name][f"command_exit_{code}"] += 1
        assert code in (0, 2, 3), f"{boundary.name}: exit {code}\n{err}"
        if refused:
            assert code == 2, f"{boundary.name}: the reader refused the input but the command exited {code}\n{err}"
        if code != 0:
            assert err.startswith("error: ") and err.count("\n") == 1, f"{boundary.name}: not one line:\n{err}"
            assert sorted(p.name for p in Path(tmp).iterdir()) == listing, f"{boundary.name}: wrote {err}"
        assert snapshot(case, shared.root) == inputs, f"{boundary.name}: the command changed its input"
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("boundary", BOUNDARIES, ids=[b.name for b in BOUNDARIES])
@settings(max_examples=FAST_EXAMPLES, derandomize=True, **COMMON)
@given(data=st.data())
def test_fuzz_fast(boundary: Boundary, data: st.DataObject) -> None:
    fuzz_case(boundary, data)


@pytest.mark.slow
@pytest.mark.parametrize("boundary", BOUNDARIES, ids=[b.name for b in BOUNDARIES])
def test_fuzz_slow(boundary: Boundary) -> None:
    scale = float(os.environ.get("INCREMENTAL_FUZZ_SCALE", "1"))
    @settings(max_examples=max(1, round(boundary.slow_examples * scale)), **COMMON)
    @given(data=st.data())
    def cases(data: st.DataObject) -> None:
        fuzz_case(boundary, data)

    cases()


def test_the_slow_profile_tries_at_least_10000_cases() -> None:
    assert sum(b.slow_examples for b in BOUNDARIES) >= 10_000
