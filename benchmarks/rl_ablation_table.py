"""A Markdown table from an offline-RL sweep (``energyflow run recipes/qipo_*.yaml --multirun ...``):
one row per point, its swept overrides, the behaviour policy's score (round 0, = BC), and QIPO's
last and best normalised scores (mean ± std over the point's seeds), with the number of seeds.

usage: python benchmarks/rl_ablation_table.py SWEEP_DIR [SWEEP_DIR ...] [--title TITLE]

Several sweep directories (e.g. one per dataset) give one table; the dataset is a column when the
points do not all share one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from energyflow.sweeps import point_dirs, point_overrides  # noqa: E402


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def rows(sweep_dirs: list[str]) -> list[dict]:
    out = []
    for sweep in sweep_dirs:
        for point in point_dirs(sweep):
            path = os.path.join(point, "results.json")
            if not os.path.isfile(path):
                out.append({"point": point, "overrides": point_overrides(point), "missing": True})
                continue
            with open(path, encoding="utf-8") as f:
                res = json.load(f)
            curves = list(res.get("curves", {}).values())
            out.append({"point": point, "overrides": point_overrides(point), "dataset": res.get("dataset"),
                        "algo": res.get("algo"), "seeds": len(curves),
                        "bc": [c[0] for c in curves], "last": res["last"]["per_seed"], "best": res["best"]["per_seed"]})
    return out


def table(found: list[dict], title: str = "") -> str:
    datasets = {r.get("dataset") for r in found if not r.get("missing")}
    lines = [f"**{title}**", ""] if title else []
    # overrides shared by every point (the dataset, the cache...) go in the caption, not in each row
    shared = set.intersection(*(set(r["overrides"]) for r in found)) if len(found) > 1 else set()
    if shared:
        lines += [f"Common to every row: `{' '.join(o for o in found[0]['overrides'] if o in shared)}`", ""]
    head = ["overrides"] + (["dataset"] if len(datasets) > 1 else []) + ["seeds", "round 0 (BC)", "last", "best"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in found:
        name = " ".join(o for o in r["overrides"] if o not in shared
                        and not o.startswith(("run_dir", "num_threads"))) or "(defaults)"
        if r.get("missing"):
            lines.append(f"| {name} | not finished |")
            continue
        cells = [name] + ([str(r["dataset"])] if len(datasets) > 1 else []) + [
            str(r["seeds"]), _mean_std(r["bc"]), _mean_std(r["last"]), _mean_std(r["best"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", help="multirun sweep directories (or single run directories' parents)")
    p.add_argument("--title", default="")
    args = p.parse_args()
    print(table(rows(args.sweeps), args.title))


if __name__ == "__main__":
    main()
