"""``dualtoken eval --compare A B``: the results of two runs side by side, with what differs between them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no results.json (pass a `dualtoken eval --out` folder or its results.json)")
    try:
        payload = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), dict):
        raise ValueError(f"{file}: expected an object with a 'results' mapping (a dualtoken eval results file)")
    return payload


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def compare_results(first: Path, second: Path) -> str:
    """A Markdown table: task, metric, A, B, B - A; then the run settings that differ per task."""
    a, b = _load(first), _load(second)
    lines = [f"A = {first}", f"B = {second}", "", "| task | metric | A | B | B - A |", "|---|---|---|---|---|"]
    for task in sorted(set(a["results"]) | set(b["results"])):
        metrics_a, metrics_b = a["results"].get(task, {}), b["results"].get(task, {})
        for metric in list(dict.fromkeys([*metrics_a, *metrics_b])):
            value_a, value_b = metrics_a.get(metric), metrics_b.get(metric)
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value_a, value_b))
            delta = _cell(value_b - value_a) if numeric else ""
            lines.append(f"| {task} | {metric} | {_cell(value_a)} | {_cell(value_b)} | {delta} |")
    differences = []
    runs_a, runs_b = a.get("runs", {}), b.get("runs", {})
    for task in sorted(set(runs_a) & set(runs_b)):
        for field in sorted(set(runs_a[task]) | set(runs_b[task])):
            if field == "cache_key":
                continue
            if runs_a[task].get(field) != runs_b[task].get(field):
                differences.append(
                    f"- {task}: {field} differs: A {json.dumps(runs_a[task].get(field), sort_keys=True)}"
                    f" / B {json.dumps(runs_b[task].get(field), sort_keys=True)}"
                )
    lines += ["", "Differences between the runs:" if differences else "The runs used the same model and settings."]
    lines += differences
    return "\n".join(lines) + "\n"
