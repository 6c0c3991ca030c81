"""`python -m pytest_dpo evaluate ...`: evaluate checkpoints and print their metrics, without pytest.

`python -m pytest_dpo report DIR`: re-render a report's Markdown summary and plot from its JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .options import option_spec
from .settings import SETTINGS, DPOSettings, SettingsError
from .spelling import option, spelled_for


def _parser() -> argparse.ArgumentParser:
    """The command line; its flags are spelt by `option()`, so call it inside `spelled_for("cli")`."""
    parser = argparse.ArgumentParser(prog="python -m pytest_dpo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evaluate", help="evaluate checkpoints and print TRL's DPO eval metrics")
    run.add_argument("checkpoints", nargs="+", help="model or adapter folders, globs, or TRL output_dirs")
    run.add_argument(option("eval_set"), required=True, help=option_spec("eval_set").help)
    run.add_argument(option("reference"), help=option_spec("reference").help)
    run.add_argument("--json", metavar="FILE", help="also write metrics and per-example arrays to FILE")
    for setting in SETTINGS:
        if setting.is_flag:
            run.add_argument(
                option(setting.name), dest=setting.name, help=setting.help_with_default, action="store_const", const="true"
            )
        else:
            run.add_argument(option(setting.name), dest=setting.name, help=setting.help_with_default, default=None)
    report = commands.add_parser(
        "report", help="re-render dpo_summary.md and dpo_metrics.png from DIR/dpo_report.json (no models)"
    )
    report.add_argument("directory", metavar="DIR", help="the folder holding dpo_report.json")
    return parser


def _given_settings(args: argparse.Namespace) -> dict[str, str]:
    """The settings given on the command line, as text by field name."""
    values = {setting.name: getattr(args, setting.name) for setting in SETTINGS}
    return {name: text for name, text in values.items() if text is not None}


def main(argv: Sequence[str] | None = None) -> int:
    with spelled_for("cli"):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":
        return _rerender(Path(args.directory))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    from .checkpoints import CheckpointError, discover_checkpoints
    from .evalset import EvalSetError, load_eval_set
    from .evaluation import CheckpointEvaluation
    from .report_terminal import metrics_table
    from .run_settings import COMMAND_LINE, resolve_settings

    try:
        given = _given_settings(args)
        settings = DPOSettings.from_text(given)
        try:
            eval_set = load_eval_set(args.eval_set)
        except EvalSetError as error:
            raise EvalSetError(f"{option('eval_set')}: {error}") from None
        checkpoints = [
            found for spec in args.checkpoints for found in discover_checkpoints(spec, allow_pickle=settings.allow_pickle)
        ]
        print(f"eval set {eval_set.path}: {len(eval_set)} rows, {eval_set.format}, sha256 {eval_set.sha256[:12]}")
        results = []
        for checkpoint in checkpoints:
            resolved = resolve_settings(settings, dict.fromkeys(given, COMMAND_LINE), checkpoint.path)
            result = CheckpointEvaluation(checkpoint, eval_set, args.reference, resolved.settings).score()
            print(f"{checkpoint.name}: {checkpoint.path} vs {result.reference}")
            print(f"  settings: {resolved.describe()}")
            for warning in resolved.warnings:
                print(f"  warning: {warning}")
            results.append(result)
    except SettingsError as error:
        print(f"error: {option(error.field)}: {error}", file=sys.stderr)
        return 2
    except (EvalSetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(metrics_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                [{"checkpoint": r.checkpoint, "metrics": r.metrics, "settings": r.settings,
                  "per_example": r.per_example.to_dict(), "dropped_rows": r.dropped_rows,
                  "eval_set_sha256": r.eval_set_sha256} for r in results],
                handle,
                indent=1,
            )
    return 0


def _rerender(directory: Path) -> int:
    from .report_files import REPORT_JSON_FILE, ReportError, load_report, write_views

    try:
        report = load_report(directory / REPORT_JSON_FILE)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in write_views(directory, report):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
