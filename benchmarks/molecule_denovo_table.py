"""The de novo results table of docs/molecules_denovo.md: mean ± std over seeds of each row of
``results.json`` from runs of ``recipes/molecule_qed.yaml``.

    for s in 0 1 2; do energyflow run recipes/molecule_qed.yaml seed=$s --run-dir runs/denovo/qed_s$s; done
    python benchmarks/molecule_denovo_table.py runs/denovo/qed_s0 runs/denovo/qed_s1 runs/denovo/qed_s2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

COLUMNS = [("validity", "validity", 1.0), ("uniqueness", "uniqueness", 1.0), ("novelty", "novelty", 1.0),
           ("internal_diversity", "int. diversity", 1.0), ("target_fraction", "target fraction", 1.0)]
PROPERTIES = [("qed", "mean QED"), ("logp", "mean logP"), ("sa", "mean SA")]


def _cell(values: list[float], digits: int = 3) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"


def table(results: list[dict]) -> str:
    """Markdown: one row per model or baseline, each cell the mean ± std over the runs."""
    first = results[0]
    order = ["training set", "training best", "unguided", "efm", "iterative"]
    rows = sorted(first["rows"], key=lambda n: next((i for i, o in enumerate(order) if n.startswith(o)), len(order)))
    head = ["", *[c[1] for c in COLUMNS], *[p[1] for p in PROPERTIES], "ms / molecule"]
    seeds = ", ".join(str(r["seed"]) for r in results)
    betas = sorted({round(r["beta"], 4) for r in results})
    lines = [f"{first['dataset']}: energy {first['energy']}, β = {', '.join(map(str, betas))} ({first['beta_setting']}), "
             f"representation {first.get('representation', 'tokens')}, {first['num_samples']} samples per model, "
             f"seeds {seeds}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in rows:
        per = [r["rows"][name] for r in results if name in r["rows"]]
        cells = [_cell([row.get(key, math.nan) for row in per]) for key, _, _ in COLUMNS]
        cells += [_cell([row["properties"].get(p, {}).get("mean", math.nan) for row in per]) for p, _ in PROPERTIES]
        ms = [1000 * row["seconds_per_molecule"] for row in per if "seconds_per_molecule" in row]
        cells.append(_cell(ms, 2) if ms else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories of recipes/molecule_qed.yaml (one per seed)")
    args = parser.parse_args(argv)
    results = []
    for d in args.run_dirs:
        path = os.path.join(d, "results.json")
        if not os.path.exists(path):
            print(f"no results.json in {d} (did the run finish?)", file=sys.stderr)
            return 2
        with open(path) as f:
            results.append(json.load(f))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
