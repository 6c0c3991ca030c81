"""Several named eval sets, their subsets and per-set gates, in real pytest runs on the bundled TRL run.

`eval_topics.jsonl` labels each row with its topic in a `subset` column. On checkpoint-2 its overall margin is
positive while the `colours` subset's is negative, which is what a subset gate is for.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets  # noqa: F401
import peft  # noqa: F401
import pytest
import transformers  # noqa: F401

from pytest_dpo import evaluate
from pytest_dpo.config import read_run_config
from pytest_dpo.eval_sets import (
    EvalSetSpecError,
    parse_eval_set_options,
    parse_eval_set_values,
)
from pytest_dpo.evalset import load_eval_set
from pytest_dpo.gates import GateError, parse_gate
from pytest_dpo.options import ALL_OPTIONS, ConfigError

from .fixture_paths import BASE, DATA, EVAL_STANDARD, FULL_RUN
from .hub_datasets import hub, jsonl_bytes, offline, push_dataset, read_jsonl  # noqa: F401 (hub: a fixture)
from .hub_server import HubServer

pytest_plugins = ["pytester"]
# The heavy libraries above are imported before any in-process pytester run: pytester removes modules first
# imported during a run, and importing torch's C extensions a second time crashes the interpreter.

EVAL_TOPICS = DATA / "eval_topics.jsonl"
CHECKPOINT_2 = f"--dpo-checkpoint={FULL_RUN}/checkpoint-2"
CHECKPOINT_4 = f"--dpo-checkpoint={FULL_RUN}/checkpoint-4"
TWO_SETS = [
    f"--dpo-reference={BASE}",
    f"--dpo-eval-set=helpful={EVAL_STANDARD}",
    f"--dpo-eval-set=topics={EVAL_TOPICS}",
    "--dpo-subset-column=subset",
    "--dpo-lock=none",
    "-p",
    "no:cacheprovider",
]


def swapped(path: Path, into: Path) -> Path:
    """The eval set with chosen and rejected swapped: a set every trained checkpoint gets wrong."""
    rows = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in read_jsonl(path)]
    into.write_bytes(jsonl_bytes(rows))
    return into


# -- declaring sets, options and gates ------------------------------------------------------------


def test_values_name_sets_and_a_bare_path_is_the_default_set(tmp_path: Path) -> None:
    odd = tmp_path / "a=b.jsonl"
    odd.write_text("{}\n")
    specs = parse_eval_set_values(["eval.jsonl", "safety = evals/s.jsonl", "hub=hub:org/ds:test@v1", "# a comment"], "x")
    assert [(spec.name, spec.source) for spec in specs] == [
        ("default", "eval.jsonl"),
        ("safety", "evals/s.jsonl"),
        ("hub", "hub:org/ds:test@v1"),
    ]
    assert [(spec.name, spec.source) for spec in parse_eval_set_values([str(odd)], "x")] == [("default", str(odd))]
    assert parse_eval_set_values(["data/x=1.jsonl"], "x")[0].name == "default"  # a path with '=', not a name
    with pytest.raises(EvalSetSpecError, match=r"^x: eval set 'default' is given twice \(eval.jsonl and other.jsonl\)"):
        parse_eval_set_values(["eval.jsonl", "other.jsonl"], "x")
    with pytest.raises(EvalSetSpecError, match=r"^x: 'a b' in 'a b=e.jsonl' is not an eval-set name"):
        parse_eval_set_values(["a b=e.jsonl"], "x")
    with pytest.raises(EvalSetSpecError, match=r"^x: eval set 'safety' has no path in 'safety='\. Write safety=PATH\."):
        parse_eval_set_values(["safety="], "x")


def test_per_set_options_take_only_tokenization_settings_checked_as_settings() -> None:
    lines = ["safety: max_length=64 truncation_mode=keep_end", "", "helpful: max_length=none"]
    assert parse_eval_set_options(lines, "dpo_eval_set_options") == {
        "safety": {"max_length": "64", "truncation_mode": "keep_end"},
        "helpful": {"max_length": "none"},
    }
    with pytest.raises(EvalSetSpecError, match=r"^o: 'beta' cannot be set per eval set\. Per-set keys: max_length, truncation_mode"):
        parse_eval_set_options(["safety: beta=0.2"], "o")
    with pytest.raises(EvalSetSpecError, match=r"^o: cannot read 'max_length ten'\. Write `NAME: key=value …`"):
        parse_eval_set_options(["max_length ten"], "o")
    with pytest.raises(EvalSetSpecError, match=r"^o line 2: Unknown truncation_mode 'middle'. Choose from: keep_start, keep_end.$"):
        parse_eval_set_options(["a: max_length=8", "b: truncation_mode=middle"], "o")


@pytest.mark.parametrize(
    ("line", "eval_set", "subset", "text"),
    [
        ("rewards/margins > 0", None, None, "rewards/margins > 0"),
        ("safety: rewards/accuracies >= 0.9 @95%", "safety", None, "safety: rewards/accuracies >= 0.9 @95%"),
        ("helpful/math:rewards/margins>0", "helpful", "math", "helpful/math: rewards/margins > 0"),
        ("  helpful/Chat Hard : loss <= 0.7", "helpful", "Chat Hard", "helpful/Chat Hard: loss <= 0.7"),
    ],
)
def test_a_gate_line_may_name_its_set_and_subset(line: str, eval_set: str | None, subset: str | None, text: str) -> None:
    gate = parse_gate(line, "dpo_gates line 1")
    assert (gate.eval_set, gate.subset, str(gate)) == (eval_set, subset, text)
    assert parse_gate(str(gate), "again") == gate


def test_a_gate_with_two_prefixes_is_refused() -> None:
    with pytest.raises(GateError, match=r"^g: gate 'a: b: loss < 1' has two eval-set prefixes"):
        parse_gate("a: b: loss < 1", "g")


def _read(options: dict[str, list[str]], ini: dict[str, list[str]] | None = None):
    empty = {key: [] if spec.ini_type in ("paths", "linelist") else "" for spec in ALL_OPTIONS for key in spec.ini_keys}
    return read_run_config({f"dpo_{name}": value for name, value in options.items()}.get, {**empty, **(ini or {})}.__getitem__, None)


def test_a_gate_without_a_prefix_applies_to_every_set() -> None:
    config = _read({"eval_set": ["a=a.jsonl", "b=b.jsonl"], "gate": ["loss < 1", "b: loss < 0.5"]})
    assert [str(gate) for gate in config.gates] == ["a: loss < 1", "b: loss < 1", "b: loss < 0.5"]
    single = _read({"eval_set": ["a.jsonl"], "gate": ["loss < 1"]})
    assert [str(gate) for gate in single.gates] == ["loss < 1"]


def test_unknown_set_names_in_gates_and_options_are_usage_errors_naming_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^dpo_gates line 2: gate 'safty: loss < 1' names eval set 'safty', which this "
                                          r"run does not have\. Known eval sets: helpful, safety\.$"):
        _read({}, {"dpo_eval_sets": ["helpful = h.jsonl", "safety = s.jsonl"], "dpo_gates": ["loss < 2", "safty: loss < 1"]})
    with pytest.raises(ConfigError, match=r"Known eval sets: x\. \(--dpo-eval-set on the command line replaces the ini "
                                          r"file's eval sets\.\)$"):
        _read({"eval_set": ["x=x.jsonl"]}, {"dpo_eval_sets": ["safety = s.jsonl"], "dpo_gates": ["safety: loss < 1"]})
    with pytest.raises(ConfigError, match=r"^--dpo-eval-set-options: options for eval set 'safty', which this run does "
                                          r"not have\. Known eval sets: default\.$"):
        _read({"eval_set": ["e.jsonl"], "eval_set_options": ["safty: max_length=8"]})


# -- results of one checkpoint on several sets ------------------------------------------------------


def test_a_subset_is_scored_exactly_like_an_eval_set_of_its_rows(tmp_path: Path) -> None:
    topics = load_eval_set(EVAL_TOPICS, subset_column="subset")
    result = evaluate(FULL_RUN / "checkpoint-2", topics, reference=BASE)
    assert result.subsets == ["capitals", "colours", "arithmetic"]
    colours = tmp_path / "colours.jsonl"
    colours.write_bytes(jsonl_bytes([row for row in read_jsonl(EVAL_TOPICS) if row["subset"] == "colours"]))
    alone = evaluate(FULL_RUN / "checkpoint-2", colours, reference=BASE)
    subset = result.subset("colours")
    assert subset.num_examples == alone.num_examples == 8
    for name, value in alone.metrics.items():
        assert subset.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert subset.metrics["rewards/margins"] < 0 < result.metrics["rewards/margins"]
    assert repr(subset).startswith("EvalResult(checkpoint-2 (default/colours):")
    with pytest.raises(ValueError, match=r"no subset 'maths'\. Its subsets: capitals, colours, arithmetic\.$"):
        result.subset("maths")
    with pytest.raises(ValueError, match=r"the eval set has no subsets\. Name the column that splits it with --dpo-subset-column"):
        evaluate(FULL_RUN / "checkpoint-2", EVAL_TOPICS, reference=BASE).subset("colours")


USER_TESTS = """
    import pytest
    from pytest_dpo import assert_margin_positive

    def test_every_set(dpo_results, dpo_result, dpo_eval_set):
        assert list(dpo_results) == ["helpful", "topics"]
        assert dpo_result is dpo_results["helpful"] and dpo_eval_set.path.endswith("eval_standard.jsonl")
        assert dpo_results["topics"].subsets == ["capitals", "colours", "arithmetic"]

    def test_colours_subset(dpo_results):
        assert_margin_positive(dpo_results["topics"].subset("colours"))

    @pytest.mark.dpo_eval_set("topics")
    def test_on_topics(dpo_result, dpo_metrics, dpo_eval_set):
        assert dpo_result.eval_set_name == "topics" and dpo_eval_set.path.endswith("eval_topics.jsonl")
        assert dpo_metrics is dpo_result.metrics
        assert_margin_positive(dpo_result)
"""


def test_dpo_results_subsets_and_the_marker_work_in_user_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_release=USER_TESTS)
    result = pytester.runpytest("-v", CHECKPOINT_2, *TWO_SETS)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_every_set?checkpoint-2? PASSED*",
            "*test_colours_subset?checkpoint-2? FAILED*",
            "*test_on_topics?checkpoint-2-topics? PASSED*",
            "*AssertionError: checkpoint-2 (topics/colours): rewards/margins = -0.17* is not above 0 (N=8 rows scored)",
        ]
    )


def test_a_subset_gate_catches_what_the_overall_metric_hides_and_holds_the_checkpoint_back(
    pytester: pytest.Pytester,
) -> None:
    gates = ["--dpo-gate=topics: rewards/margins > 0", "--dpo-gate=topics/colours: rewards/margins > 0"]
    result = pytester.runpytest("-v", CHECKPOINT_2, *TWO_SETS, *gates, "--dpo-save-dir=released")
    result.stdout.fnmatch_lines(
        [
            "dpo-gate[[]checkpoint-2: topics: rewards/margins > 0[]] PASSED*",
            "dpo-gate[[]checkpoint-2: topics/colours: rewards/margins > 0[]] FAILED*",
            "checkpoint-2: topics/colours: gate failed: rewards/margins = -0.17* is not above 0 (N=8 rows scored)",
        ]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert not (pytester.path / "released").exists() or not any((pytester.path / "released").iterdir())


def test_a_checkpoint_passing_helpful_but_failing_safety_is_held_back_and_not_published(pytester: pytest.Pytester) -> None:
    safety = swapped(EVAL_STANDARD, pytester.path / "safety.jsonl")
    options = [CHECKPOINT_4, f"--dpo-reference={BASE}", f"--dpo-eval-set=helpful={EVAL_STANDARD}", f"--dpo-eval-set=safety={safety}"]
    result = pytester.runpytest(
        "-v", "-n", "2", "-p", "no:cacheprovider", *options, "--dpo-gate=rewards/margins > 0", "--dpo-save-dir=released"
    )
    result.stdout.fnmatch_lines(
        [
            "*dpo-gate[[]checkpoint-4: helpful: rewards/margins > 0[]]*",
            "*dpo-gate[[]checkpoint-4: safety: rewards/margins > 0[]]*",
        ]
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*failed: dpo-gate[[]checkpoint-4: safety: rewards/margins > 0[]]"])
    assert not (pytester.path / "released" / "checkpoint-4").exists()
    lock = json.loads((pytester.path / "dpo.lock").read_text())
    assert sorted(lock["eval_sets"]) == ["helpful", "safety"]
    assert lock["eval_sets"]["safety"]["eval_set_path"] == "safety.jsonl"


COUNT_LOADS = """
    import json
    import pytest_dpo.evaluation as evaluation

    LOADS = []
    for name in ("load_policy", "load_reference"):
        def counted(*args, _load=getattr(evaluation, name), _name=name, **kwargs):
            LOADS.append(_name)
            return _load(*args, **kwargs)
        setattr(evaluation, name, counted)

    def pytest_unconfigure(config):
        with open("loads.json", "w") as handle:
            json.dump(LOADS, handle)
"""


def test_each_model_is_loaded_once_per_checkpoint_for_all_sets_and_a_set_keeps_its_own_max_length(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(COUNT_LOADS)
    pytester.makepyfile(
        test_lengths="""
        def test_lengths(dpo_results):
            assert dpo_results["helpful"].settings["max_length"] == 128  # the run's
            assert dpo_results["topics"].settings["max_length"] == 12
            assert len(dpo_results["topics"].dropped_rows) > 0 == len(dpo_results["helpful"].dropped_rows)
        """
    )
    result = pytester.runpytest_subprocess(
        CHECKPOINT_4, *TWO_SETS, "--dpo-no-cache", "--dpo-eval-set-options=topics: max_length=12"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["dpo eval set topics: *eval_topics.jsonl (24 rows, standard, sha256 *, max_length=12)"])
    assert json.loads((pytester.path / "loads.json").read_text()) == ["load_policy", "load_reference"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dpo-gate=topic/colours: loss < 1"], "--dpo-gate line 1: gate 'topic/colours: loss < 1' names eval set 'topic', which "
                                                 "this run does not have. Known eval sets: helpful, topics."),
        (["--dpo-gate=topics/colors: loss < 1"], "--dpo-gate line 1: gate 'topics/colors: loss < 1' is on subset 'colors', which "
                                                 "eval set 'topics' does not have. Its subsets (subset): capitals, colours, "
                                                 "arithmetic."),
        (["--dpo-gate=helpful/colours: loss < 1"], "--dpo-gate line 1: gate 'helpful/colours: loss < 1' is on subset 'colours', but "
                                                   "eval set 'helpful' has no column 'subset', so it has no subsets.*"),
        (["--dpo-subset-column=topic"], "--dpo-subset-column / dpo_subset_column: no eval set has a column 'topic'. Their "
                                        "other columns: subset.*"),
        (["--dpo-eval-set-options=safety: max_length=8"], "--dpo-eval-set-options: options for eval set 'safety', which "
                                                          "this run does not have. Known eval sets: helpful, topics."),
        (["--dpo-eval-set=topics=other.jsonl"], "--dpo-eval-set: eval set 'topics' is given twice*"),
    ],
)
def test_bad_sets_subsets_and_options_are_usage_errors(pytester: pytest.Pytester, options: list[str], message: str) -> None:
    pytester.makepyfile(test_x="def test_x(dpo_result):\n    pass\n")
    base = [option for option in TWO_SETS if not (option == "--dpo-subset-column=subset" and "--dpo-subset-column=topic" in options)]
    result = pytester.runpytest(CHECKPOINT_4, *base, *options)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_a_marker_naming_an_unknown_set_is_an_error_naming_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_x="""
        import pytest

        @pytest.mark.dpo_eval_set("safety")
        def test_x(dpo_result):
            pass
        """
    )
    result = pytester.runpytest(CHECKPOINT_4, *TWO_SETS)
    assert result.ret == pytest.ExitCode.INTERRUPTED  # pytest's exit status for errors during collection
    result.stdout.fnmatch_lines(
        ["test_x.py::test_x: @pytest.mark.dpo_eval_set('safety') must name one of this run's eval sets: helpful, "
         "topics. Write e.g. @pytest.mark.dpo_eval_set('helpful')."]
    )
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output and "Traceback" not in output and "raise " not in output


def test_a_hub_eval_set_loads_offline_and_its_revision_lands_in_the_lock(
    pytester: pytest.Pytester, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import snapshot_download

    sha = push_dataset({"data/test.jsonl": jsonl_bytes(read_jsonl(EVAL_TOPICS))})
    snapshot_download("tester/prefs", repo_type="dataset")  # what `hf download` does before going offline
    pytester.makepyfile(
        test_hub="""
        def test_hub(dpo_results):
            assert dpo_results["topics"].metrics == dpo_results["local"].metrics
        """
    )
    requests_before = len(hub.requests)
    with offline(monkeypatch):
        result = pytester.runpytest(
            CHECKPOINT_4, f"--dpo-reference={BASE}", "--dpo-eval-set=topics=hub:tester/prefs",
            f"--dpo-eval-set=local={EVAL_TOPICS}", "-p", "no:cacheprovider",
        )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"dpo eval set topics: hub:tester/prefs (24 rows, standard, sha256 *, revision {sha[:12]})"])
    entry = json.loads((pytester.path / "dpo.lock").read_text())["eval_sets"]["topics"]
    assert entry["revision"] == sha and entry["eval_set_path"] == "hub:tester/prefs"
    assert len(hub.requests) == requests_before  # read from the local cache alone
