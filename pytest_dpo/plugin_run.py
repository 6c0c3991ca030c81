"""The hooks of a run with checkpoints: gate items, ordering, verdicts, xdist and torchrun merging, publishing,
reports and the terminal summary. Registered by `plugin.pytest_configure` only when checkpoints are given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .gates import Gate
from .metric_table import MOE_METRICS
from .plugin import TARGET_FIXTURE, VERDICTS, session_of
from .plugin_fixtures import evaluated
from .verdicts import Verdicts, gate_nodeid

if TYPE_CHECKING:
    from .distributed import World
    from .publish import PublicationReport
    from .results import EvalResult
    from .session import DPOSession

CHECKPOINT_PROPERTY = "dpo_checkpoint"


class GateFailed(AssertionError):
    """A built-in gate did not hold."""


class GateItem(pytest.Item):
    """One ini gate for one checkpoint (and eval set, subset): `dpo-gate[checkpoint-500: safety: rewards/accuracies >= 0.9]`."""

    def __init__(self, *, checkpoint_id: str, gate: Gate, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint_id = checkpoint_id
        self.gate = gate

    def runtest(self) -> None:
        dpo_session = session_of(self.config)
        result = evaluated(dpo_session, self.checkpoint_id)[self.gate.eval_set or dpo_session.default_set]
        if self.gate.subset is not None:
            result = result.subset(self.gate.subset)
        if self.gate.metric in MOE_METRICS and self.gate.metric not in result.metrics:
            raise GateFailed(
                f"{self.checkpoint_id}: has no {self.gate.metric}, which TRL reports only for a mixture-of-experts "
                "policy whose load-balancing loss is enabled (router logits and router_aux_loss_coef != 0)."
            )
        failure = self.gate.check(result)
        if failure is not None:
            raise GateFailed(f"{self.checkpoint_id}: {self.gate.scope_prefix}gate failed: {failure}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, GateFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return "dpo_gates", None, self.name


def checkpoint_of(item: pytest.Item) -> str | None:
    """The checkpoint a test item is for, or None for a test that is not a DPO test."""
    if isinstance(item, GateItem):
        return item.checkpoint_id
    target = _target_of(item)
    return target[0] if target else None


def _target_of(item: pytest.Item) -> tuple[str, str] | None:
    value = getattr(getattr(item, "callspec", None), "params", {}).get(TARGET_FIXTURE)
    return value if isinstance(value, tuple) else None


class ActiveRun:
    """The hooks that only matter when checkpoints are configured; registered by `pytest_configure`."""

    def __init__(self, config: pytest.Config, dpo_session: DPOSession) -> None:
        self.config = config
        self.dpo_session = dpo_session
        self.verdicts = config.stash[VERDICTS]
        # Per checkpoint id, each eval set's result: this process's, and under xdist the workers'.
        self.results: dict[str, dict[str, EvalResult]] = {}
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.is_worker = hasattr(config, "workerinput")
        self.is_controller = not self.is_worker and getattr(config.option, "dist", "no") != "no"
        self.judges = not self.is_worker and not config.option.collectonly
        self.world = dpo_session.world
        self.is_main = self.world is None or self.world.is_main
        self.publication: PublicationReport | None = None
        self.report_lines: list[str] = []

    def pytest_report_header(self) -> list[str]:
        """The eval sets, the columns they ignore, each checkpoint's settings with their sources, and warnings."""
        from .session import EvaluationFailed

        lines = []
        for name, eval_set in self.dpo_session.eval_sets.items():
            label = "dpo eval set" if len(self.dpo_session.eval_sets) == 1 else f"dpo eval set {name}"
            lines.append(f"{label}: {eval_set.path} ({_eval_set_facts(eval_set, self.dpo_session.eval_set_specs[name].options)})")
            lines += [f"{label}: {note}" for note in eval_set.notes]
            if eval_set.ignored_columns:
                lines.append(f"{label} ignored columns: {', '.join(eval_set.ignored_columns)}")
        described: dict[str, list[str]] = {}
        warnings: list[str] = []
        for checkpoint_id in self.dpo_session.ids:
            try:
                resolved = self.dpo_session.checkpoint_settings(checkpoint_id)
            except EvaluationFailed as error:
                warnings.append(f"{checkpoint_id}: {error}")
                continue
            described.setdefault(resolved.describe(), []).append(checkpoint_id)
            warnings += [f"{checkpoint_id}: {warning}" for warning in resolved.warnings]
        for description, checkpoint_ids in described.items():
            which = "" if len(described) == 1 else f" ({', '.join(checkpoint_ids)})"
            lines.append(f"dpo settings{which}: {description}")
        return lines + [f"dpo warning: {warning}" for warning in warnings]

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        """Add one gate item per gate per checkpoint; runs first, so -k/-m deselection sees them."""
        for checkpoint_id in self.dpo_session.ids:
            for gate in self.dpo_session.config.gates:
                name = gate_nodeid(checkpoint_id, str(gate))
                gate_item = GateItem.from_parent(session, name=name, nodeid=name, checkpoint_id=checkpoint_id, gate=gate)
                items.append(gate_item)

    @pytest.hookimpl(specname="pytest_collection_modifyitems", trylast=True)
    def order_by_checkpoint(self, items: list[pytest.Item]) -> None:
        """Run each checkpoint's tests together, in checkpoint order (a `dpo_eval_set` marker's tests grouped by
        set), after -k/-m deselection.

        Sorting here, not later: pytest-xdist workers report their collection
        right after this hook and address tests by position.
        """
        order = {checkpoint_id: index for index, checkpoint_id in enumerate(self.dpo_session.ids)}
        sets = {name: index for index, name in enumerate(self.dpo_session.eval_sets)}

        def position(item: pytest.Item) -> tuple[int, int]:
            checkpoint_id = checkpoint_of(item)
            target = _target_of(item)
            return (-1 if checkpoint_id is None else order[checkpoint_id], sets[target[1]] if target else -1)

        items.sort(key=position)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Register each checkpoint's tests for its verdict, each gate item with the gate it checks."""
        for item in session.items:
            checkpoint_id = checkpoint_of(item)
            if checkpoint_id is not None:
                gate = str(item.gate) if isinstance(item, GateItem) else None
                self.verdicts.expect(checkpoint_id, item.nodeid, gate=gate)
                item.user_properties.append((CHECKPOINT_PROPERTY, checkpoint_id))

    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        """Put the checkpoint's metrics into the test's properties (junit XML shows them)."""
        checkpoint_id = checkpoint_of(item)
        if checkpoint_id in self.dpo_session.results:
            for eval_set, result in self.dpo_session.results[checkpoint_id].items():
                prefix = "dpo/" if eval_set == self.dpo_session.default_set else f"dpo/{eval_set}/"
                item.user_properties.extend((f"{prefix}{name}", value) for name, value in result.metrics.items())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        checkpoint_id = dict(report.user_properties).get(CHECKPOINT_PROPERTY)
        if checkpoint_id is not None and not self.is_controller:
            self.verdicts.record(checkpoint_id, report.nodeid, report.when, report.outcome)

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """xdist controller with the default `--dist load`: keep each checkpoint's tests on one worker."""
        if config.getvalue("dist") != "load":
            return None
        from .xdist_scheduling import CheckpointScheduling

        return CheckpointScheduling(config, log, self.dpo_session.ids, [str(gate) for gate in self.dpo_session.config.gates])

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: merge a worker's verdicts and results; a crashed worker taints every checkpoint."""
        output = getattr(node, "workeroutput", {})
        if "dpo_verdicts" in output:
            self.verdicts.merge_json(output["dpo_verdicts"])
        self.dpo_session.timings.update(output.get("dpo_timings", {}))
        for name, count in output.get("dpo_cache_stats", {}).items():
            setattr(self.dpo_session.cache.stats, name, getattr(self.dpo_session.cache.stats, name) + count)
        if output.get("dpo_results"):
            from .results import EvalResult

            for checkpoint_id, by_set in output["dpo_results"].items():
                self.results[checkpoint_id] = {name: EvalResult.from_dict(data) for name, data in by_set.items()}
        self.samples.update(output.get("dpo_samples", {}))
        if error is not None:
            for verdict in self.verdicts:
                self.verdicts.add_problem(verdict.checkpoint, f"worker {node.gateway.id} crashed")

    def pytest_internalerror(self, excrepr: Any, excinfo: Any) -> None:
        """Taint every verdict: an internal error (here or on an xdist worker) can cut short a test whose call passed.

        Under xdist the controller's exit status may stay 1, so the exit status alone does not tell.
        """
        problem = "an internal error stopped the session"
        for verdict in self.verdicts:
            if problem not in verdict.problems:
                self.verdicts.add_problem(verdict.checkpoint, problem)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.is_worker:
            self.config.workeroutput["dpo_verdicts"] = self.verdicts.to_json()
            self.config.workeroutput["dpo_results"] = {
                checkpoint_id: {name: result.to_dict() for name, result in by_set.items()}
                for checkpoint_id, by_set in self.dpo_session.results.items()
            }
            self.config.workeroutput["dpo_cache_stats"] = dataclasses.asdict(self.dpo_session.cache.stats)
            self.config.workeroutput["dpo_timings"] = self.dpo_session.timings
            self.config.workeroutput["dpo_samples"] = self._own_samples()
            return
        if not self.judges:
            return
        if self.world is not None:
            self._merge_rank_verdicts(self.world)
        self.results.update(self.dpo_session.results)
        self.samples.update(self._own_samples())
        for checkpoint_id in self.dpo_session.ids:
            results = self.results.get(checkpoint_id)
            try:
                self.config.hook.pytest_dpo_checkpoint_verdict(
                    checkpoint=self.dpo_session.checkpoint(checkpoint_id),
                    verdict=self.verdicts[checkpoint_id],
                    result=results[self.dpo_session.default_set] if results else None,
                    results=results,
                )
            except Exception as error:  # a team's hook that breaks holds its checkpoint back; the session goes on
                problem = f"pytest_dpo_checkpoint_verdict hook raised {type(error).__name__}: {error}"
                self.verdicts.add_problem(checkpoint_id, problem)
        if session.exitstatus == pytest.ExitCode.OK and not all(verdict.passed for verdict in self.verdicts):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.dpo_session.config.publish.active and self.is_main:
            self.publication = self._publish(session)
            if self.publication.error is not None:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
            self.config.hook.pytest_dpo_published(publication=self.publication)
        if self.dpo_session.config.report_dir and self.is_main:
            self.report_lines = self._write_report()
        if not self.is_main and session.exitstatus == pytest.ExitCode.TESTS_FAILED:
            # torchrun stops every rank once one exits non-zero; rank 0 alone reports the verdict, so it is never
            # stopped while it saves and pushes.
            session.exitstatus = pytest.ExitCode.OK

    def _merge_rank_verdicts(self, world: World) -> None:
        """torchrun: every rank takes the verdicts of all ranks merged, so a test that failed on any rank holds the
        checkpoint back everywhere and all ranks agree."""
        merged = Verdicts(self.dpo_session.ids)
        for rank_verdicts in world.gather(self.verdicts.to_json()):
            merged.merge_json(rank_verdicts)
        self.verdicts = self.config.stash[VERDICTS] = merged

    def _own_samples(self) -> dict[str, list[dict[str, Any]]]:
        return {
            checkpoint_id: [sample.to_dict() for sample in samples]
            for checkpoint_id, samples in self.dpo_session.samples.items()
        }

    def _write_report(self) -> list[str]:
        from .model_card import versions
        from .report import (
            build_report,
            eval_set_record,
            named_eval_set_records,
            per_example_of,
            report_entry,
        )
        from .report_files import write_report

        session = self.dpo_session
        defaults = self._default_results()
        entries = [
            report_entry(
                session.checkpoint(checkpoint_id),
                self.verdicts[checkpoint_id],
                defaults.get(checkpoint_id),
                evaluate_seconds=session.timings.get(checkpoint_id),
                samples=self.samples.get(checkpoint_id, ()),
                checkpoint_id=checkpoint_id,
                settings=self._settings_record(checkpoint_id),
                results=self.results.get(checkpoint_id),
            )
            for checkpoint_id in session.ids
        ]
        settings = next(iter(defaults.values())).settings if defaults else session.config.settings.to_dict()
        report = build_report(
            entries,
            eval_set=eval_set_record(session.eval_set),
            gates=[str(gate) for gate in session.config.gates],
            settings=settings,
            versions=versions(),
            eval_sets=named_eval_set_records(session.eval_sets, session.eval_set_specs),
        )
        lines: list[str] = []
        written = write_report(Path(session.config.report_dir or "."), report, per_example_of(entries), log=lines.append)
        return lines + [f"wrote {path}" for path in written]

    def _default_results(self) -> dict[str, EvalResult]:
        """Each checkpoint's result on the default eval set: the report's top-level numbers and settings."""
        return {checkpoint_id: by_set[self.dpo_session.default_set] for checkpoint_id, by_set in self.results.items()}

    def _settings_record(self, checkpoint_id: str) -> dict[str, Any] | None:
        from .session import EvaluationFailed

        try:
            return self.dpo_session.checkpoint_settings(checkpoint_id).to_dict()
        except EvaluationFailed:
            return None

    def _publish(self, session: pytest.Session) -> PublicationReport:
        from .publish import PublicationReport, publish

        if session.exitstatus == pytest.ExitCode.INTERRUPTED:
            return PublicationReport(["session interrupted: nothing saved or pushed"])
        if session.exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            # An internal error (a plugin's hook raised) stops the run mid-test: a verdict may miss a failure.
            ended = f"session ended with exit status {int(session.exitstatus)}"
            return PublicationReport([f"{ended}: nothing saved or pushed"])
        releases = [
            self.dpo_session.release(checkpoint_id, self.results[checkpoint_id], self.verdicts[checkpoint_id])
            for checkpoint_id in self.verdicts.passed_checkpoints()
        ]
        if self.dpo_session.config.publish.push_which == "last":
            releases = releases[-1:]
        return publish(releases, self.dpo_session.config.publish)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.judges or not self.is_main:
            return
        from .report_terminal import verdict_table

        terminalreporter.section("DPO checkpoints")
        for line in verdict_table(self.dpo_session.ids, self.results, self.verdicts).splitlines():
            terminalreporter.line(line)
        if self.dpo_session.lock_status:
            terminalreporter.line(f"eval-set lock {self.dpo_session.config.lock}: {self.dpo_session.lock_status}")
        stats = self.dpo_session.cache.stats
        where = self.dpo_session.cache.directory or "memory only"
        terminalreporter.line(f"score cache: {stats.hits} hits, {stats.misses} misses, {stats.rebuilt} rebuilt ({where})")
        for line in self.report_lines:
            terminalreporter.line(line)
        if self.publication is not None:
            terminalreporter.section("DPO publishing")
            for line in self.publication.lines:
                terminalreporter.line(line, red=line.startswith("error"))



def _eval_set_facts(eval_set: Any, options: Any) -> str:
    """`24 rows, standard, sha256 …`, with the Hub revision and the set's own settings where it has them."""
    facts = [f"{len(eval_set)} rows", eval_set.format, f"sha256 {eval_set.sha256[:12]}"]
    if eval_set.revision is not None:
        facts.append(f"revision {eval_set.revision[:12]}")
    facts += [f"{key}={value}" for key, value in options.items()]
    return ", ".join(facts)
