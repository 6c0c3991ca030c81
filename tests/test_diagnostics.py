"""DPO failure-mode diagnostics: each one against its definition on simulated per-example arrays, their bounds
and symmetries, NaN/inf handling, the table they are declared in, gates, and a real run's report.

The definitions are computed here directly in Python (Spearman's rho by hand, no scipy) from the same
float32 values `pytest_dpo.diagnostics` reads.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
import re
import statistics

import huggingface_hub  # noqa: F401
import jsonschema
import peft  # noqa: F401
import pytest
import torch
import transformers  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest_dpo.diagnostics
from pytest_dpo.__main__ import main
from pytest_dpo.checks import check_metric
from pytest_dpo.diagnostics import diagnose, row_values, undefined_cause
from pytest_dpo.gates import GateError, parse_gate
from pytest_dpo.metric_table import (
    DIAGNOSTIC_NAMES,
    DIAGNOSTIC_PREFIX,
    DIAGNOSTICS,
    DIAGNOSTICS_BY_NAME,
    INTERVAL_DIAGNOSTICS,
    METRIC_NAMES,
    PER_EXAMPLE,
    non_finite_cause,
)
from pytest_dpo.report_files import (
    REPORT_JSON_FILE,
    SUMMARY_FILE,
    load_report,
    report_schema,
)
from pytest_dpo.results import EvalResult, PerExample
from pytest_dpo.stats import mean_interval, metric_interval, wilson_interval
from pytest_dpo.strategies import eval_results

from .fixture_paths import BASE, EVAL_STANDARD, FULL_RUN, ROOT

pytest_plugins = ["pytester"]
# The heavy libraries above are imported before the in-process pytester run: pytester removes modules first
# imported during a run, and importing torch's C extensions a second time crashes the interpreter.

DISPLACEMENT = "diagnostics/likelihood_displacement"
CHOSEN_CHANGE = "diagnostics/chosen_logps_change"
REJECTED_CHANGE = "diagnostics/rejected_logps_change"
CORRELATION = "diagnostics/margin_length_correlation"
TIED = "diagnostics/tied_rewards"
SHARES = (DISPLACEMENT, TIED)
LOGP_FIELDS = ("policy_chosen_logps", "reference_chosen_logps", "policy_rejected_logps", "reference_rejected_logps")
# Which per-example arrays each diagnostic reads: a NaN in one of them makes it NaN, in any other leaves it be.
READS = {
    "policy_chosen_logps": (DISPLACEMENT, CHOSEN_CHANGE),
    "reference_chosen_logps": (DISPLACEMENT, CHOSEN_CHANGE),
    "policy_rejected_logps": (REJECTED_CHANGE,),
    "reference_rejected_logps": (REJECTED_CHANGE,),
    "chosen_rewards": (TIED,),
    "rejected_rewards": (TIED,),
    "margins": (CORRELATION,),
}
# Multiples of 1/64 down to -64, and a few whole numbers so that rows tie often: float32 holds their sums
# with small integers exactly.
LOGP = st.one_of(st.integers(-8, 0).map(float), st.integers(-64 * 64, 0).map(lambda k: k / 64))
ROW_LINE = re.compile(r"^  row +(\d+)  ")


def simulated_arrays(logps: dict[str, list[float]], tokens: dict[str, list[int]], beta: float) -> PerExample:
    """Per-example arrays of these log-probs and token counts, with TRL's rewards and margins in float32."""
    tensors = {name: torch.tensor(values, dtype=torch.float32) for name, values in logps.items()}
    chosen_rewards = beta * (tensors["policy_chosen_logps"] - tensors["reference_chosen_logps"])
    rejected_rewards = beta * (tensors["policy_rejected_logps"] - tensors["reference_rejected_logps"])
    n = len(tokens["chosen_tokens"])
    arrays = {f.name: [0] * n for f in dataclasses.fields(PerExample)} | logps | tokens
    arrays |= {
        "rows": list(range(n)),
        "chosen_rewards": chosen_rewards.tolist(),
        "rejected_rewards": rejected_rewards.tolist(),
        "margins": (chosen_rewards - rejected_rewards).tolist(),
    }
    return PerExample.from_dict(arrays)


@st.composite
def per_examples(draw: st.DrawFn, min_size: int = 0, max_size: int = 24, logp: st.SearchStrategy = LOGP) -> PerExample:
    """Simulated per-example arrays: log-probs that often tie, completions of 1 to 64 tokens, beta 0.1 to 1."""
    n = draw(st.integers(min_size, max_size))
    logps = {name: draw(st.lists(logp, min_size=n, max_size=n)) for name in LOGP_FIELDS}
    tokens = {name: draw(st.lists(st.integers(1, 64), min_size=n, max_size=n))
              for name in ("chosen_tokens", "rejected_tokens")}
    return simulated_arrays(logps, tokens, draw(st.sampled_from((0.1, 0.25, 1.0))))


def result_of(per_example: PerExample) -> EvalResult:
    return EvalResult(checkpoint="checkpoint-3", checkpoint_path="/runs/dpo/checkpoint-3", reference="base", metrics={},
                      per_example=per_example, dropped_rows=[], eval_set_sha256="0" * 64, settings={})


def same(actual: float, expected: float) -> bool:
    """Equal up to float64 rounding, NaN matching NaN and an infinity itself."""
    if math.isnan(expected) or math.isinf(expected):
        return actual == expected or (math.isnan(actual) and math.isnan(expected))
    return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9)


def average_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in order[start : end + 1]:
            ranks[position] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson's correlation of the average ranks; NaN with a NaN, fewer than 2 values or a constant input."""
    if len(x) < 2 or any(map(math.isnan, x)) or len(set(x)) == 1 or len(set(y)) == 1:
        return math.nan
    return statistics.correlation(average_ranks(x), average_ranks(y))


def share(holds: list[bool], read: list[list[float]]) -> float:
    """The share of rows where `holds`; NaN when a value read is NaN, or there are no rows."""
    if not holds or any(math.isnan(value) for values in read for value in values):
        return math.nan
    return statistics.fmean(holds)


def mean_change(policy: list[float], reference: list[float]) -> float:
    # A plain sum, as IEEE arithmetic has it: -inf and inf make NaN (`math.fsum` refuses them).
    return sum(p - r for p, r in zip(policy, reference)) / len(policy) if policy else math.nan


def by_definition(p: PerExample) -> dict[str, float]:
    """The README's one-line definitions, computed in plain Python."""
    a = {name: getattr(p, name).tolist() for name in (*LOGP_FIELDS, "chosen_rewards", "rejected_rewards", "margins")}
    chosen, reference_chosen = a["policy_chosen_logps"], a["reference_chosen_logps"]
    lengths = [c - r for c, r in zip(p.chosen_tokens.tolist(), p.rejected_tokens.tolist())]
    return {
        DISPLACEMENT: share([c < r for c, r in zip(chosen, reference_chosen)], [chosen, reference_chosen]),
        CHOSEN_CHANGE: mean_change(chosen, reference_chosen),
        REJECTED_CHANGE: mean_change(a["policy_rejected_logps"], a["reference_rejected_logps"]),
        CORRELATION: spearman(a["margins"], lengths),
        TIED: share([c == r for c, r in zip(a["chosen_rewards"], a["rejected_rewards"])],
                    [a["chosen_rewards"], a["rejected_rewards"]]),
    }


def swapped(p: PerExample) -> PerExample:
    """Every row's chosen and rejected completions exchanged."""
    return dataclasses.replace(
        p,
        policy_chosen_logps=p.policy_rejected_logps, policy_rejected_logps=p.policy_chosen_logps,
        reference_chosen_logps=p.reference_rejected_logps, reference_rejected_logps=p.reference_chosen_logps,
        chosen_rewards=p.rejected_rewards, rejected_rewards=p.chosen_rewards, margins=-p.margins,
        chosen_tokens=p.rejected_tokens, rejected_tokens=p.chosen_tokens,
    )


# Log-probs of impossible tokens (-inf) next to the usual ones.
@given(p=per_examples(logp=LOGP | st.just(-math.inf)))
@settings(max_examples=300, deadline=None)
def test_each_diagnostic_is_its_definition(p: PerExample) -> None:
    values, expected = diagnose(p), by_definition(p)
    assert tuple(values) == DIAGNOSTIC_NAMES
    for name in DIAGNOSTIC_NAMES:
        assert same(values[name], expected[name]), (name, values[name], expected[name])


@given(p=per_examples())
@settings(max_examples=200, deadline=None)
def test_shares_lie_in_0_1_and_the_correlation_in_minus_1_1_or_is_undefined(p: PerExample) -> None:
    values = diagnose(p)
    if len(p) == 0:
        assert all(math.isnan(value) for value in values.values())
        return
    assert all(0.0 <= values[name] <= 1.0 for name in SHARES)
    assert math.isfinite(values[CHOSEN_CHANGE]) and math.isfinite(values[REJECTED_CHANGE])
    lengths = (p.chosen_tokens - p.rejected_tokens).tolist()
    undefined = len(p) < 2 or len(set(p.margins.tolist())) == 1 or len(set(lengths)) == 1
    assert math.isnan(values[CORRELATION]) == undefined
    assert undefined or -1.0 <= values[CORRELATION] <= 1.0


@given(p=per_examples())
@settings(max_examples=200, deadline=None)
def test_swapping_chosen_and_rejected_swaps_the_changes_and_keeps_ties_and_the_correlation(p: PerExample) -> None:
    before, after = diagnose(p), diagnose(swapped(p))
    assert same(after[CHOSEN_CHANGE], before[REJECTED_CHANGE]) and same(after[REJECTED_CHANGE], before[CHOSEN_CHANGE])
    assert same(after[TIED], before[TIED])
    # Both the margin and the length difference change sign, so their rank correlation stays.
    assert same(after[CORRELATION], before[CORRELATION])
    fell = [c < r for c, r in zip(p.policy_rejected_logps.tolist(), p.reference_rejected_logps.tolist())]
    assert same(after[DISPLACEMENT], statistics.fmean(fell) if fell else math.nan)


@given(p=per_examples())
@settings(max_examples=200, deadline=None)
def test_reversing_one_side_of_the_correlation_flips_its_sign(p: PerExample) -> None:
    rho = diagnose(p)[CORRELATION]
    lengths_reversed = dataclasses.replace(p, chosen_tokens=p.rejected_tokens, rejected_tokens=p.chosen_tokens)
    margins_reversed = dataclasses.replace(p, margins=-p.margins)
    assert same(diagnose(lengths_reversed)[CORRELATION], -rho)
    assert same(diagnose(margins_reversed)[CORRELATION], -rho)
    # A rank correlation sees only the order: doubling every margin keeps it exactly.
    assert same(diagnose(dataclasses.replace(p, margins=2 * p.margins))[CORRELATION], rho)


@given(p=per_examples(), shift=st.integers(-16, 16).map(float))
@settings(max_examples=200, deadline=None)
def test_a_constant_added_to_the_policy_log_probs_moves_both_changes_by_it(p: PerExample, shift: float) -> None:
    before = diagnose(p)
    moved = diagnose(dataclasses.replace(p, policy_chosen_logps=p.policy_chosen_logps + shift,
                                         policy_rejected_logps=p.policy_rejected_logps + shift))
    for name in (CHOSEN_CHANGE, REJECTED_CHANGE):
        assert same(moved[name], before[name] + shift), name
    # Moving the reference along with the policy changes neither the changes nor who was displaced.
    both = diagnose(dataclasses.replace(
        p, policy_chosen_logps=p.policy_chosen_logps + shift, policy_rejected_logps=p.policy_rejected_logps + shift,
        reference_chosen_logps=p.reference_chosen_logps + shift,
        reference_rejected_logps=p.reference_rejected_logps + shift,
    ))
    for name in (CHOSEN_CHANGE, REJECTED_CHANGE, DISPLACEMENT):
        assert same(both[name], before[name]), name


@given(data=st.data(), p=per_examples(min_size=1))
@settings(max_examples=200, deadline=None)
def test_permuting_the_rows_changes_nothing(data: st.DataObject, p: PerExample) -> None:
    order = torch.tensor(data.draw(st.permutations(range(len(p)))))
    permuted = PerExample(**{f.name: getattr(p, f.name)[order] for f in dataclasses.fields(p)})
    before, after = diagnose(p), diagnose(permuted)
    for name in DIAGNOSTIC_NAMES:
        assert same(after[name], before[name]), name


@given(data=st.data(), p=per_examples(min_size=1), array=st.sampled_from(sorted(READS)))
@settings(max_examples=200, deadline=None)
def test_a_nan_makes_exactly_the_diagnostics_that_read_it_nan(data: st.DataObject, p: PerExample, array: str) -> None:
    values = getattr(p, array).clone()
    values[data.draw(st.integers(0, len(p) - 1))] = math.nan
    before, after = diagnose(p), diagnose(dataclasses.replace(p, **{array: values}))
    for name in DIAGNOSTIC_NAMES:
        if name in READS[array]:
            assert math.isnan(after[name]), name
        else:
            assert same(after[name], before[name]), name


def test_infinite_log_probs_count_as_numbers_and_a_gate_blames_the_scores() -> None:
    p = simulated_arrays(
        {"policy_chosen_logps": [-math.inf, -3.0], "reference_chosen_logps": [-5.0, -2.0],
         "policy_rejected_logps": [-4.0, -6.0], "reference_rejected_logps": [-4.0, -5.0]},
        {"chosen_tokens": [3, 5], "rejected_tokens": [4, 4]}, 0.1,
    )
    values = diagnose(p)
    assert values[DISPLACEMENT] == 1.0 and values[CHOSEN_CHANGE] == -math.inf and values[REJECTED_CHANGE] == -0.5
    failure = check_metric(result_of(p), CHOSEN_CHANGE, ">", -10.0)
    assert failure is not None and failure.startswith(f"{CHOSEN_CHANGE} is -inf, not above -10: {non_finite_cause()}")


@pytest.mark.parametrize(
    ("chosen_tokens", "policy_chosen_logps", "cause"),
    [
        ([7, 7, 7], [-1.0, -2.0, -3.0], "every row's chosen completion is 2 tokens longer than its rejected one"),
        ([7, 8, 9], [-2.0, -2.0, -2.0], "every row has the same margin, so the margins rank nothing"),
        ([7], [-1.0], "a rank correlation needs at least 2 rows, and 1 was scored"),
    ],
)
def test_an_undefined_correlation_is_nan_and_a_gate_on_it_says_why(
    chosen_tokens: list[int], policy_chosen_logps: list[float], cause: str
) -> None:
    n = len(chosen_tokens)
    p = simulated_arrays(
        {"policy_chosen_logps": policy_chosen_logps, "reference_chosen_logps": [-2.0] * n,
         "policy_rejected_logps": [-4.0] * n, "reference_rejected_logps": [-4.0] * n},
        {"chosen_tokens": chosen_tokens, "rejected_tokens": [5] * n}, 0.1,
    )
    assert math.isnan(diagnose(p)[CORRELATION]) and cause in undefined_cause(p, CORRELATION)
    failure = check_metric(result_of(p), CORRELATION, "<", 0.3)
    assert failure is not None and failure.startswith(f"{CORRELATION} is NaN, not below 0.3: {cause}")
    assert undefined_cause(p, CHOSEN_CHANGE) is None


def test_with_no_rows_every_diagnostic_is_nan_for_that_reason() -> None:
    p = simulated_arrays({name: [] for name in LOGP_FIELDS}, {"chosen_tokens": [], "rejected_tokens": []}, 0.1)
    assert all(math.isnan(value) for value in diagnose(p).values())
    assert {undefined_cause(p, name) for name in DIAGNOSTIC_NAMES} == {"no rows were scored"}


def test_the_table_names_its_own_diagnostics_apart_from_trl_metrics() -> None:
    assert all(name.startswith(DIAGNOSTIC_PREFIX) for name in DIAGNOSTIC_NAMES)
    assert not set(DIAGNOSTIC_NAMES) & set(METRIC_NAMES)
    assert not any(name.startswith(DIAGNOSTIC_PREFIX) for name in METRIC_NAMES)
    for diagnostic in DIAGNOSTICS:
        # A share or a mean of per-row values has an interval; the rank correlation has neither.
        assert (diagnostic.kind == PER_EXAMPLE) == diagnostic.has_interval
        assert (diagnostic.interval == "wilson") == (diagnostic.name in SHARES)
        if diagnostic.ranked_by is not None:
            assert DIAGNOSTICS_BY_NAME[diagnostic.ranked_by].kind == PER_EXAMPLE


@given(p=per_examples(min_size=2), method=st.sampled_from(("t", "bootstrap")))
@settings(max_examples=50, deadline=None)
def test_each_diagnostic_with_an_interval_is_the_mean_of_its_row_values_and_gets_the_tables_interval(
    p: PerExample, method: str
) -> None:
    values = diagnose(p)
    for name in INTERVAL_DIAGNOSTICS:
        rows = row_values(p, name)
        assert same(float(rows.mean()), values[name]), name
        interval = metric_interval(p, name, 0.9, method)
        if DIAGNOSTICS_BY_NAME[name].interval == "wilson":
            assert interval == wilson_interval(int(rows.sum()), len(p), 0.9)
        else:
            assert interval == mean_interval(rows, 0.9, method=method)
    with pytest.raises(ValueError, match="is one value over the eval set and has no per-row values"):
        metric_interval(p, CORRELATION)
    with pytest.raises(ValueError, match="has no per-row values"):
        row_values(p, CORRELATION)


@given(result=eval_results(max_size=16))
@settings(max_examples=30, deadline=None)
def test_a_result_has_its_diagnostics_apart_from_its_metrics_and_keeps_them_through_a_round_trip(
    result: EvalResult,
) -> None:
    assert tuple(result.diagnostics) == DIAGNOSTIC_NAMES and not set(result.diagnostics) & set(result.metrics)
    again = EvalResult.from_dict(result.to_dict())
    assert all(same(again.diagnostics[name], result.diagnostics[name]) for name in DIAGNOSTIC_NAMES)


@given(p=per_examples(min_size=1), name=st.sampled_from(DIAGNOSTIC_NAMES))
@settings(max_examples=200, deadline=None)
def test_a_failure_lists_the_rows_worst_by_the_diagnostics_own_per_row_value(p: PerExample, name: str) -> None:
    diagnostic = DIAGNOSTICS_BY_NAME[name]
    ranking = diagnostic.ranked_by or (name if diagnostic.kind == PER_EXAMPLE else None)
    op = "<" if diagnostic.higher_is_better else ">"
    failure = check_metric(result_of(p), name, op, -math.inf if op == "<" else math.inf)
    assert failure is not None
    heading, listed = failure.splitlines()[1], [int(m.group(1)) for m in map(ROW_LINE.match, failure.splitlines()) if m]
    if ranking is None:
        assert heading == f"worst {len(listed)} of {len(p)} by lowest rewards/margins:"
        return
    worst_is_highest = DIAGNOSTICS_BY_NAME[ranking].worst_is_highest
    assert heading == f"worst {min(3, len(p))} of {len(p)} by {'highest' if worst_is_highest else 'lowest'} {ranking}:"
    values = row_values(p, ranking).tolist()
    ordered = sorted(values, key=lambda value: (not math.isnan(value), -value if worst_is_highest else value))
    assert sorted(values[row] for row in listed) == sorted(ordered[: len(listed)])


def test_gate_lines_name_diagnostics_and_refuse_what_they_cannot_judge() -> None:
    gate = parse_gate(f"{DISPLACEMENT} <= 0.5 @95%", "dpo_gates line 1")
    assert (gate.metric, gate.operator, gate.threshold, gate.confidence) == (DISPLACEMENT, "<=", 0.5, 0.95)
    assert parse_gate(f"{CORRELATION} < 0.3", "dpo_gates line 1").metric == CORRELATION
    with pytest.raises(GateError, match=re.escape(f"{CORRELATION} is one value over the eval set, so it has no")):
        parse_gate(f"{CORRELATION} < 0.3 @95%", "dpo_gates line 1")
    with pytest.raises(GateError) as refused:
        parse_gate("diagnostics/displacement <= 0.5", "dpo_gates line 2")
    message = str(refused.value)
    assert message.startswith("dpo_gates line 2: unknown metric 'diagnostics/displacement'")
    assert f"Known metrics: {', '.join(METRIC_NAMES)}. Known diagnostics: {', '.join(DIAGNOSTIC_NAMES)}." in message


def test_the_readme_defines_each_diagnostic_in_one_line_with_its_direction_and_interval() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    intervals = {"wilson": "Wilson", "mean": "t or bootstrap", None: "none"}
    for diagnostic in DIAGNOSTICS:
        better = "higher" if diagnostic.higher_is_better else "lower"
        row = f"| `{diagnostic.name}` | {diagnostic.definition} | {better} | {intervals[diagnostic.interval]} |"
        assert row in readme, row


def test_docstring_doctests_hold() -> None:
    outcome = doctest.testmod(pytest_dpo.diagnostics, raise_on_error=False, report=False)
    assert outcome.attempted and not outcome.failed


def test_a_diagnostics_gate_holds_back_one_checkpoint_passes_another_and_reaches_the_report(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = f"{DISPLACEMENT} <= 0.9"
    pytester.makeini(f"[pytest]\ndpo_gates =\n    {gate}\n    {TIED} <= 0.5 @95%\ndpo_report = out\n")
    pytester.makepyfile(test_m="def test_m(dpo_result):\n    assert 'diagnostics/tied_rewards' not in dpo_result.metrics\n")
    result = pytester.runpytest(f"--dpo-checkpoint={FULL_RUN}", f"--dpo-reference={BASE}",
                                f"--dpo-eval-set={EVAL_STANDARD}", "--dpo-lock=none", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, failed=2)
    result.stdout.fnmatch_lines([
        f"checkpoint-4: gate failed: {DISPLACEMENT} = 0.9167 is not at most 0.9 (N=24 rows scored)",
        f"worst 3 of 24 by lowest {CHOSEN_CHANGE}:",
        "  row 4  chosen change  -67.32  margins  -5.693  chosen  -6.732",
    ])
    directory = pytester.path / "out"
    report = json.loads((directory / REPORT_JSON_FILE).read_text())
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)
    assert [(c["id"], c["verdict"]["passed"]) for c in report["checkpoints"]] == [
        ("checkpoint-2", True), ("checkpoint-4", False), ("checkpoint-6", False),
    ]
    arrays = json.loads((directory / "dpo_per_example.json").read_text())
    for checkpoint in report["checkpoints"]:
        assert not any(name.startswith(DIAGNOSTIC_PREFIX) for name in checkpoint["metrics"])
        expected = by_definition(PerExample.from_dict(arrays[checkpoint["id"]]))
        assert list(checkpoint["diagnostics"]) == list(DIAGNOSTIC_NAMES)
        assert all(same(checkpoint["diagnostics"][name], expected[name]) for name in DIAGNOSTIC_NAMES)
        assert sorted(checkpoint["diagnostic_intervals"]) == sorted(INTERVAL_DIAGNOSTICS)
    assert report["checkpoints"][0]["diagnostics"][DISPLACEMENT] == 19 / 24
    markdown = (directory / SUMMARY_FILE).read_text()
    lines = markdown.splitlines()
    start = lines.index(f"## Diagnostics (`{DIAGNOSTIC_PREFIX}…`)")
    assert lines[start + 2] == "| checkpoint | " + " | ".join(n.removeprefix(DIAGNOSTIC_PREFIX) for n in DIAGNOSTIC_NAMES) + " |"
    assert lines[start + 4].startswith("| checkpoint-2 | 0.7917 [0.60, 0.91] | -4.3577 [")
    assert [line.split(" | ")[0] for line in lines[start + 4 : start + 7]] == [
        "| checkpoint-2", "| checkpoint-4", "| checkpoint-6"
    ]
    assert f"- failed gate `{gate}`: {DISPLACEMENT} = **0.9167** [0.74, 0.98], required <= 0.9" in markdown

    # Re-rendered from the JSON alone the same; a report written before diagnostics existed renders without them.
    (directory / SUMMARY_FILE).unlink()
    assert main(["report", str(directory)]) == 0
    assert (directory / SUMMARY_FILE).read_text() == markdown
    for checkpoint in report["checkpoints"]:
        del checkpoint["diagnostics"], checkpoint["diagnostic_intervals"]
    (directory / REPORT_JSON_FILE).write_text(json.dumps(report))
    assert load_report(directory / REPORT_JSON_FILE) == report
    assert main(["report", str(directory)]) == 0
    old = (directory / SUMMARY_FILE).read_text()
    assert "Diagnostics" not in old and f"- failed gate `{gate}`: {DISPLACEMENT} = **—**" in old
    capsys.readouterr()
