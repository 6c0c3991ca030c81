"""The metrics plot of a JSON report (`dpo_metrics.png`): the summary metrics against training step,
a row of panels per eval set when the run had several.

matplotlib is optional and imported only here, only to plot.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .gates import Gate, GateError, parse_gate
from .report_scopes import scoped

# The summary metrics (`metric_table.SUMMARY_METRICS`) by panel: chosen and rejected rewards share one, being read
# against each other.
_PANELS = (
    ("Reward margins", ("rewards/margins",)),
    ("Reward accuracy", ("rewards/accuracies",)),
    ("Chosen / rejected rewards", ("rewards/chosen", "rewards/rejected")),
    ("Loss", ("loss",)),
)
_FIGURE_SIZE = (10, 7)
# With several eval sets: a row of the four panels per set.
_ROW_FIGURE_WIDTH = 16
_ROW_HEIGHT = 3.4
_TITLE_HEIGHT = 0.5
_ALL_STEP_TICKS = 8
_TICK_LABEL_LIMIT = 16
_DPI = 100


def render_plot(report: Mapping[str, Any], path: Path) -> bool:
    """Plot the main metrics against training step into a PNG at `path`; False (nothing written) without matplotlib.

    See `plot_figure` for what is drawn.
    """
    figure = plot_figure(report)
    if figure is None:
        return False
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(Path(path), buffer.getvalue())
    return True


def plot_figure(report: Mapping[str, Any]) -> Any:
    """The metrics plot as a matplotlib `Figure`, or None without matplotlib.

    One eval set: its four panels in a 2 × 2 grid. Several (the report's `eval_sets`): one row of the four
    panels per set, in run order, each row titled with the set's name (a subfigure). Checkpoints without a
    step come after the last step, labelled by id. Gate thresholds are dashed lines (a gate on a set only
    in that set's row; gates on subsets are not drawn), confidence intervals shaded bands, held-back
    checkpoints red crosses. Uses matplotlib's object API with the Agg canvas, so pyplot's global state is
    never touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    checkpoints = report["checkpoints"]
    positions, ticks, tick_labels = _positions(checkpoints, MaxNLocator)
    order = sorted(range(len(checkpoints)), key=lambda index: positions[index])
    row = _Row(
        xs=[positions[index] for index in order],
        ordered=[checkpoints[index] for index in order],
        ticks=(ticks, tick_labels),
        gates=_plot_gates(report["gates"]),
        x_label="training step" if any(c["step"] is not None for c in checkpoints) else "checkpoint",
    )
    eval_sets = report.get("eval_sets", [])
    if len(eval_sets) <= 1:
        figure = Figure(figsize=_FIGURE_SIZE, dpi=_DPI, layout="constrained")
        FigureCanvasAgg(figure)
        eval_set = report["eval_set"]
        figure.suptitle(f"DPO eval metrics: {eval_set['name']} ({eval_set['rows']} rows)")
        only = eval_sets[0]["name"] if eval_sets else None
        row.draw(list(figure.subplots(2, 2).flat), row.ordered, only, bottom=2)
        return figure
    height = _ROW_HEIGHT * len(eval_sets) + _TITLE_HEIGHT
    figure = Figure(figsize=(_ROW_FIGURE_WIDTH, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle("DPO eval metrics")
    subfigures = figure.subfigures(len(eval_sets), 1, squeeze=False).flat
    for number, (eval_set, subfigure) in enumerate(zip(eval_sets, subfigures), start=1):
        subfigure.suptitle(f"Eval set: {eval_set['name']} ({eval_set['file']}, {eval_set['rows']} rows)")
        records = [scoped(checkpoint, eval_set["name"]) or {} for checkpoint in row.ordered]
        bottom = len(_PANELS) if number == len(eval_sets) else 0
        row.draw(list(subfigure.subplots(1, len(_PANELS)).flat), records, eval_set["name"], bottom=bottom)
    return figure


@dataclass(frozen=True)
class _Row:
    """What every row of panels shares: checkpoint positions and order, ticks, gates."""

    xs: list[float]
    ordered: list[Mapping[str, Any]]
    ticks: tuple[list[float], list[str]]
    gates: list[Gate]
    x_label: str

    def draw(self, panels: list[Any], records: list[Mapping[str, Any]], eval_set: str | None, bottom: int) -> None:
        """The four panels of one eval set from each checkpoint's record of it (`metrics`, `intervals`), with
        the gates on that set (or on every set); the last `bottom` panels get the x label."""
        failed = [i for i, checkpoint in enumerate(self.ordered) if not checkpoint["verdict"]["passed"]]
        gates = [gate for gate in self.gates if gate.subset is None and gate.eval_set in (None, eval_set)]
        for axes, (title, metrics) in zip(panels, _PANELS):
            series = {metric: [_nan(r.get("metrics", {}).get(metric)) for r in records] for metric in metrics}
            for metric, values in series.items():
                line = axes.plot(self.xs, values, marker="o", markersize=4, label=metric)[0]
                _interval_band(axes, self.xs, records, metric, line.get_color())
            if failed:
                axes.plot([self.xs[i] for i in failed for _ in metrics], [v[i] for i in failed for v in series.values()],
                          linestyle="none", marker="x", markersize=9, markeredgewidth=2, color="tab:red",
                          label="held back")
            for gate in gates:
                if gate.metric in metrics:
                    axes.axhline(gate.threshold, linestyle="--", linewidth=1, color="0.35", label=f"gate: {gate}")
            axes.set_title(title)
            axes.set_xticks(*self.ticks)
            axes.grid(alpha=0.3)
            axes.legend(fontsize="small")
        for axes in panels[len(panels) - bottom :] if bottom else []:
            axes.set_xlabel(self.x_label)


def _positions(checkpoints: Sequence[Mapping[str, Any]], locator: Any) -> tuple[list[float], list[float], list[str]]:
    """x position of each checkpoint, and the ticks: steps as numbers, step-less checkpoints by id after them."""
    steps = sorted({c["step"] for c in checkpoints if c["step"] is not None})
    gap = min((b - a for a, b in pairwise(steps)), default=1) or 1
    if steps:
        gap = max(gap, (steps[-1] - steps[0]) / 8)
    after = steps[-1] if steps else -gap
    positions = []
    extra_ticks, extra_labels = [], []
    for checkpoint in checkpoints:
        if checkpoint["step"] is None:
            after += gap
            positions.append(after)
            extra_ticks.append(after)
            name = checkpoint["id"]
            name = name if len(name) <= _TICK_LABEL_LIMIT else "…" + name[-(_TICK_LABEL_LIMIT - 1) :]
            # A second line keeps an id clear of the step numbers beside it.
            extra_labels.append("\n" + name if steps else name)
        else:
            positions.append(checkpoint["step"])
    if len(steps) <= _ALL_STEP_TICKS:
        step_ticks = list(steps)
    else:
        candidates = locator(nbins=6, integer=True).tick_values(steps[0], steps[-1])
        step_ticks = [tick for tick in candidates if steps[0] <= tick <= steps[-1]]
    return positions, step_ticks + extra_ticks, [f"{t:g}" for t in step_ticks] + extra_labels


def _interval_band(axes: Any, xs: list[float], records: Sequence[Mapping[str, Any]], metric: str, color: str) -> None:
    points = [
        (x, record["intervals"][metric])
        for x, record in zip(xs, records)
        if metric in record.get("intervals", {})
        and record["intervals"][metric]["low"] is not None
        and record["intervals"][metric]["high"] is not None
    ]
    if not points:
        return
    first = points[0][1]
    label = f"{first['confidence']:.0%} interval ({first['method']})"
    band_x = [x for x, _ in points]
    lows = [interval["low"] for _, interval in points]
    highs = [interval["high"] for _, interval in points]
    if len(points) > 1:
        axes.fill_between(band_x, lows, highs, color=color, alpha=0.18, linewidth=0, label=label)
        label = None
    centres = [(low + high) / 2 for low, high in zip(lows, highs)]
    half = [(high - low) / 2 for low, high in zip(lows, highs)]
    axes.errorbar(band_x, centres, yerr=half, fmt="none", ecolor=color, alpha=0.6, capsize=4, label=label)


def _plot_gates(lines: Sequence[str]) -> list[Gate]:
    gates = []
    for number, line in enumerate(lines, start=1):
        try:
            gates.append(parse_gate(line, f"report gate {number}"))
        except GateError:
            continue
    return gates


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
