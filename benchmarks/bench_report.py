"""Collecting samples across rounds, and printing the table and the RESULT line."""

from __future__ import annotations

import statistics
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from bench_common import Result
from bench_model import Arm, Metric, Scenario

# The RESULT line names these first, in this order; other named values follow.
RESULT_ORDER = (
    "consume_ratio", "publish_ratio", "latency_p50_ratio", "rss_ratio",
    "replay_rate", "retry_hop_ms", "telemetry_overhead",
    "replay_ratio", "retry_extra_ms", "retry_hop_paced_ms",
)  # fmt: skip
LEGEND_WIDTH = 100
SAME_WITHIN = 0.05  # a ratio within 5% of 1 is reported as a tie


class Results:
    """Every sample, by (scenario, metric key) and arm, in run order (A and B paired by index)."""

    def __init__(self) -> None:
        self._samples: defaultdict[tuple[str, str], defaultdict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )

    def add(self, scenario: Scenario, arm: str, result: Result) -> None:
        for key, value in result.items():
            self._samples[(scenario.name, key)][arm].append(value)

    def values(self, scenario: Scenario, metric: Metric, arm: str) -> list[float]:
        return self._samples[(scenario.name, metric.key)][arm]

    def derived(self, scenario: Scenario, metric: Metric) -> list[float]:
        """``metric.derive`` over each round's (A, B) pair."""
        assert metric.derive is not None
        a = self.values(scenario, metric, scenario.others[0].key)
        b = self.values(scenario, metric, scenario.subject_arm.key)
        return [metric.derive(x, y) for x, y in zip(a, b, strict=False)]

    def subject(self, scenario: Scenario, metric: Metric) -> list[float]:
        """What the B column shows: the subject's samples, or the derived values."""
        if metric.derive is not None:
            return self.derived(scenario, metric)
        return self.values(scenario, metric, scenario.subject_arm.key)

    def ratio(self, scenario: Scenario, metric: Metric, other: Arm | None = None) -> float | None:
        """Subject/other (default: A) of the medians; None for derived rows or when an arm has
        no samples."""
        if metric.derive is not None:
            return None
        a = self.values(scenario, metric, (other or scenario.others[0]).key)
        b = self.values(scenario, metric, scenario.subject_arm.key)
        if not a or not b or statistics.median(a) == 0:
            return None
        return statistics.median(b) / statistics.median(a)

    def value(self, scenario: Scenario, metric: Metric) -> float | None:
        """The median of the B column."""
        values = self.subject(scenario, metric)
        return statistics.median(values) if values else None


def _number(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _shown(value: float, metric: Metric) -> str:
    return _number(value * 100 if metric.unit == "%" else value)


def _cell(values: list[float], metric: Metric) -> str:
    if not values:
        return "-"
    text = _shown(statistics.median(values), metric)
    if len(values) > 1:
        text += f" ({_shown(min(values), metric)}-{_shown(max(values), metric)})"
    return text


def _verdict(ratio: float | None, metric: Metric, subject: str) -> str:
    if ratio is None:
        return ""
    if abs(ratio - 1) <= SAME_WITHIN:
        return "same (within 5%)"
    better = ratio > 1 if metric.higher_is_better else ratio < 1
    return f"{subject} better" if better else f"{subject} worse"


def _target(value: float | None, metric: Metric) -> str:
    if metric.target is None or value is None:
        return ""
    sign = ">=" if metric.higher_is_better else "<="
    met = value >= metric.target if metric.higher_is_better else value <= metric.target
    shown = _shown(metric.target, metric) + ("%" if metric.unit == "%" else "")
    return f"target {sign} {shown}: {'met' if met else 'MISSED'}"


def _row(cells: Iterable[str], widths: Iterable[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def _header(scenario: Scenario) -> list[str]:
    a, b = scenario.others[0], scenario.subject_arm
    return ["metric", "unit", a.title, b.title, f"{b.key}/{a.key}", "verdict"]


def _unit(metric: Metric) -> str:
    return metric.unit + (" ^" if metric.higher_is_better else " v")


def _pair_rows(results: Results, scenario: Scenario, params: Mapping[str, Any]) -> list[list[str]]:
    """Two arms: one row per metric, A and B side by side."""
    a, b = scenario.others[0], scenario.subject_arm
    rows = []
    for metric in scenario.metrics:
        ratio = results.ratio(scenario, metric)
        derived = metric.derive is not None
        verdict = _verdict(ratio, metric, b.key)
        target = _target(results.value(scenario, metric), metric)
        rows.append(
            [
                metric.label.format(**params),
                _unit(metric),
                "-" if derived else _cell(results.values(scenario, metric, a.key), metric),
                _cell(results.subject(scenario, metric), metric),
                f"{ratio:.3f}" if ratio is not None else "",
                "; ".join(filter(None, (verdict, target))),
            ]
        )
    return rows


def _contest_rows(
    results: Results, scenario: Scenario, params: Mapping[str, Any]
) -> list[list[str]]:
    """More arms: per metric, a title row and one row per arm, each with subject/that arm."""
    subject = scenario.subject_arm
    rows = [[scenario.name, "unit", "median (min-max)", f"{subject.key}/x", "verdict"]]
    for metric in scenario.metrics:
        label = metric.label.format(**params)
        rows.append([label, _unit(metric), "", "", ""])
        indent = " " * (len(label) - len(label.lstrip()) + 4)
        for arm in scenario.arms:
            if arm is subject:
                cell = _cell(results.subject(scenario, metric), metric)
                target = _target(results.value(scenario, metric), metric)
                rows.append([indent + arm.title, "", cell, "", target])
                continue
            ratio = results.ratio(scenario, metric, arm)
            rows.append(
                [
                    indent + arm.title,
                    "",
                    _cell(results.values(scenario, metric, arm.key), metric),
                    f"{ratio:.3f}" if ratio is not None else "",
                    _verdict(ratio, metric, subject.key),
                ]
            )
    return rows


def _sections(
    results: Results, scenarios: list[Scenario], params: Mapping[str, Any]
) -> list[list[list[str]]]:
    """Consecutive two-arm scenarios with the same arms share a section; others get their own."""
    sections: list[list[list[str]]] = []
    for scenario in scenarios:
        if len(scenario.arms) > 2:
            sections.append(_contest_rows(results, scenario, params))
            continue
        header = _header(scenario)
        if not sections or sections[-1][0] != header:
            sections.append([header])
        sections[-1] += _pair_rows(results, scenario, params)
    return sections


def table(results: Results, scenarios: list[Scenario], params: Mapping[str, Any]) -> list[str]:
    """One section per run of scenarios with the same arms, each under its own column titles;
    columns aligned across the sections of one layout."""
    sections = _sections(results, scenarios, params)
    widths: dict[int, list[int]] = {}
    for row in (row for section in sections for row in section):
        known = widths.setdefault(len(row), [0] * len(row))
        widths[len(row)] = [max(w, len(cell)) for w, cell in zip(known, row, strict=True)]
    lines: list[str] = []
    for section in sections:
        width = widths[len(section[0])]
        if lines:
            lines.append("")
        lines += [_row(section[0], width), "-" * (sum(width) + 2 * (len(width) - 1))]
        lines += [_row(row, width) for row in section[1:]]
    return lines


def _wrap(first: str, text: str) -> list[str]:
    return textwrap.wrap(
        text, LEGEND_WIDTH, initial_indent=first, subsequent_indent=" " * len(first)
    )


def legend(scenarios: list[Scenario]) -> list[str]:
    lines = ["What each arm does (all: persistent messages, publisher confirms, manual acks):"]
    for scenario in scenarios:
        label = f"  {scenario.name}: "
        width = max(len(arm.key) for arm in scenario.arms)
        for index, arm in enumerate(scenario.arms):
            lead = label if index == 0 else " " * len(label)
            lines += _wrap(f"{lead}{arm.key:<{width}} = ", arm.does)
    if any(m.derive is not None for s in scenarios for m in s.metrics):
        lines += _wrap(
            "  ",
            "Rows without an A value are derived from each round's A and B runs (paired in "
            "run order) or measured in B only; their cell is the median (min-max) over pairs.",
        )
    return lines


def _format(name: str, value: float | None) -> str:
    if value is None:
        return f"{name}=nan"
    return f"{name}={value:.0f}" if abs(value) >= 100 else f"{name}={value:.3f}"


def result_line(results: Results, scenarios: list[Scenario]) -> str:
    named: dict[str, float | None] = {}
    for scenario in scenarios:
        for metric in scenario.metrics:
            for arm in scenario.others:
                if metric.ratio_name is not None and arm.suffix is not None:
                    name = metric.ratio_name + (f"_{arm.suffix}" if arm.suffix else "")
                    named[name] = results.ratio(scenario, metric, arm)
            if metric.value_name is not None:
                named[metric.value_name] = results.value(scenario, metric)
    names = [n for n in RESULT_ORDER if n in named] + [n for n in named if n not in RESULT_ORDER]
    return "RESULT " + " ".join(_format(n, named[n]) for n in names)
