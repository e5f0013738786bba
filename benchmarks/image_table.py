"""The image results table from finished runs of ``recipes/image_*.yaml`` (one run directory per seed).

Each RUN_DIR holds ``eval.json`` written by ``energyflow run`` or ``energyflow eval`` (rows of method × β with the
target rate, Fréchet distance, diversity, mean JPEG size and sampling time, and the references).
Prints a Markdown table of mean ± std over the runs, rows grouped by β, and the β = 1 known-answer
check (EFM against real target-class images and against a model of the target class alone).

usage: python benchmarks/image_table.py RUN_DIR [RUN_DIR ...] [--metrics target_rate frechet diversity seconds_per_image]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

NAMES = {"efm": "EFM-OT", "efm_vp": "EFM-VP", "efm_resampled": "EFM-OT, resampled", "classifier_guidance": "classifier guidance", "cfg": "CFG (w = β)",
         "unguided": "unguided", "iterative": "iterative EFM"}
FORMATS = {"target_rate": ("target rate", 100.0, "{:.1f}"), "frechet": ("Fréchet", 1.0, "{:.2f}"),
           "diversity": ("diversity", 1.0, "{:.2f}"), "jpeg_size": ("JPEG (×32 B)", 1.0, "{:.2f}"),
           "seconds_per_image": ("ms / image", 1000.0, "{:.2f}"), "energy": ("mean E", 1.0, "{:.2f}")}


def _cell(values: list[float], metric: str) -> str:
    _, scale, fmt = FORMATS[metric]
    values = [v * scale for v in values]
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--metrics", nargs="+", default=["target_rate", "frechet", "diversity", "seconds_per_image"],
                   choices=sorted(FORMATS))
    args = p.parse_args()
    results = []
    for run in args.runs:
        with open(os.path.join(run, "eval.json"), encoding="utf-8") as f:  # the latest evaluation
            results.append(json.load(f))
    cells: dict[tuple[float, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[tuple[float, str]] = []
    for res in results:
        for row in res["rows"]:
            key = (row["beta"], row["method"])
            if key not in cells:
                order.append(key)
            for m in args.metrics:
                if row.get(m) is not None:
                    cells[key][m].append(float(row[m]))
    header = ["β", "method"] + [FORMATS[m][0] for m in args.metrics]
    print(f"{len(results)} run(s): {', '.join(os.path.basename(os.path.normpath(r)) for r in args.runs)}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for beta, method in sorted(order, key=lambda k: (k[0], list(NAMES).index(k[1]) if k[1] in NAMES else 99)):
        c = cells[(beta, method)]
        print(f"| {beta:g} | {NAMES.get(method, method)} | " + " | ".join(_cell(c[m], m) if c.get(m) else "–"
                                                               for m in args.metrics) + " |")
    refs = [r.get("reference", {}) for r in results]
    for name, label in (("real", "real target-class images"), ("class_only", "FM on target-class images only")):
        vals = [r[name] for r in refs if name in r]
        if vals:
            line = ", ".join(f"{FORMATS[m][0]} {_cell([v[m] for v in vals if v.get(m) is not None], m)}"
                             for m in args.metrics if any(v.get(m) is not None for v in vals))
            print(f"\n{label}: {line}")
    known_answer(results)


def known_answer(results: list[dict]) -> None:
    """The β = 1 check, paired within each run (each run has its own evaluator, hence its own
    feature scale): target-rate gap to real target-class images and Fréchet ratio to the model
    trained on the target class alone."""
    lines = defaultdict(lambda: defaultdict(list))
    for res in results:
        ref = res.get("reference", {})
        if "class_only" not in ref:
            continue
        for row in res["rows"]:
            if row["beta"] == 1.0 and row["method"] in ("efm", "efm_vp", "efm_resampled", "cfg", "iterative"):
                lines[row["method"]]["gap"].append(100.0 * (row["target_rate"] - ref["real"]["target_rate"]))
                lines[row["method"]]["ratio"].append(row["frechet"] / ref["class_only"]["frechet"])
    if lines:
        print("\nβ = 1 known answer (target = p(x | S)), paired per run: target-rate gap to real images (points), "
              "Fréchet / Fréchet of the class-only model")
        for method, v in lines.items():
            print(f"  {NAMES.get(method, method):22s} gap {' '.join(f'{g:+.1f}' for g in v['gap'])}   "
                  f"ratio {' '.join(f'{r:.2f}' for r in v['ratio'])}   (mean {statistics.mean(v['ratio']):.2f})")


if __name__ == "__main__":
    main()
