"""Run every benchmark on a private redis-server and emulator; print, and save JSON and a chart.

    .venv/bin/python -m bench [--quick] [--only NAME ...] [--out bench/results]

Each benchmark measures its baseline in the same run (alternating rounds) and
reports medians; the table shows value, baseline, ratio and target. Not part
of the test suite: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import redis

from .common import Result, bench_env

BENCHMARKS = ("find", "store", "memory", "encryption", "audit", "burst", "fleet", "stampede", "recovery")
"""Module names under bench/, in the order they run."""
ON_REQUEST = ("scale",)
"""Run only when named with ``--only``: ``scale`` fills a Redis with a million tokens (~2 GB, minutes)."""


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(results: list[Result]) -> None:
    header = ("benchmark", "metric", "value", "unit", "baseline", "ratio", "target", "met")
    rows = [
        (
            r.benchmark,
            r.metric,
            _fmt(r.value),
            r.unit,
            f"{r.baseline} {_fmt(r.baseline_value)}" if r.baseline else "-",
            _fmt(r.ratio),
            r.target or "-",
            {True: "yes", False: "NO", None: "-"}[r.met],
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


def write_chart(results: list[Result], path: Path) -> bool:
    """Left: ratios to the same-run baseline (goal ticks). Right: share of a budget used (1 = the limit).

    False, said on stderr, where matplotlib is not installed (it is a chart, not a result: the table and
    the JSON stand; ``--replot`` draws it later)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart (install it, then --replot)", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in results if r.goal is not None and r.ratio is not None]
    budget = [r for r in results if r.limit]
    panels = [p for p in (speed, budget) if p]
    if not panels:
        return False
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(14, 0.45 * sum(len(p) for p in panels) + 1.6 * len(panels)),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(p) + 1 for p in panels]},
    )
    row = 0
    if speed:
        _bars(axes[row][0], speed, [r.ratio or 0.0 for r in speed], [r.goal for r in speed], log=True)
        axes[row][0].set_xlabel("ratio to the baseline measured in the same run (log scale); | = goal")
        row += 1
    if budget:
        shares = [r.value / (r.limit or 1) for r in budget]
        _bars(axes[row][0], budget, shares, [1.0] * len(budget), log=False)
        axes[row][0].set_xlabel("share of the budget used (| = the limit; lower is better)")
    fig.suptitle("tokencache benchmarks (green: target met, red: missed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(ax: Any, rows: list[Result], values: list[float], marks: list[float | None], *, log: bool) -> None:
    colors = ["tab:green" if r.met else ("tab:red" if r.met is False else "tab:gray") for r in rows]
    ax.barh([f"{r.benchmark}: {r.metric}" for r in rows], values, color=colors)
    if log:
        ax.set_xscale("log")
    for i, (value, mark) in enumerate(zip(values, marks, strict=True)):
        ax.text(value, i, f" {_fmt(value)}", va="center", fontsize=8)
        if mark is not None:
            ax.plot([mark, mark], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.invert_yaxis()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (each benchmark under a minute)")
    names = BENCHMARKS + ON_REQUEST
    parser.add_argument("--only", nargs="+", choices=names, help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for JSON and PNG")
    parser.add_argument("--replot", action="store_true", help="only redraw the chart from OUT/results.json")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())["results"]
        rows = [Result(**{k: v for k, v in r.items() if k != "ratio"}) for r in saved]
        return 0 if write_chart(rows, args.out / "results.png") else 1
    results: list[Result] = []
    timings: dict[str, float] = {}
    with bench_env() as env:
        for name in args.only or BENCHMARKS:
            module = importlib.import_module(f"bench.{name}")
            print(f"== {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            env.flush()
            results.extend(module.run(env, args.quick))
            timings[name] = round(time.monotonic() - started, 1)
            print(f"== {name} done in {timings[name]} s", file=sys.stderr, flush=True)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "quick": args.quick,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "machine": platform.machine(),
        "seconds": timings,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "results": [r.as_dict() for r in results]}, indent=2) + "\n"
    )
    charted = write_chart(results, args.out / "results.png")
    wrote = f" and {args.out / 'results.png'}" if charted else ""
    print(f"wrote {args.out / 'results.json'}{wrote}", file=sys.stderr)
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
