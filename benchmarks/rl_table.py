"""The offline-RL results table and comparison figure from finished runs of ``recipes/qipo_*.yaml``.

Each RUN_DIR is a directory written by ``energyflow run`` (its ``results.json`` holds the last and
best normalised scores over seeds; ``seed<k>/summary.json`` the stage wall times).  Prints a
Markdown table (mean ± std over seeds) and, with ``--figure``, plots every run's learning curve
(mean over seeds, shaded ± std) in one PNG.

usage: python benchmarks/rl_table.py runs/qipo_walker/qipo_ot runs/qipo_walker/bc ... [--figure out.png]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

NAMES = {"qipo_ot": "QIPO-OT", "qipo_diff": "QIPO-Diff", "qgpo": "QGPO", "bc": "BC", "qipo_onestep": "QIPO one-step"}


def load(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    stages: dict[str, list[float]] = {}
    for seed in res["seeds"]:
        path = os.path.join(run_dir, f"seed{seed}", "summary.json")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        for name, v in summary["stage_seconds"].items():
            computed = (summary.get("stage_compute_seconds") or {}).get(name)
            if computed is not None:  # the stage's own compute time, recorded by the run
                stages.setdefault(name, []).append(computed)
                continue
            stage_dir = (summary.get("stages") or {}).get(name)  # older runs: absolute stage folders
            done = os.path.join(stage_dir, "done.json") if stage_dir else ""
            if os.path.exists(done):  # the stage's own compute time, even when this run loaded it from the cache
                with open(done, encoding="utf-8") as f:
                    stages.setdefault(name, []).append(json.load(f).get("seconds", v))
            elif v >= 1.0:  # < 1 s: loaded from the cache, computed by another run
                stages.setdefault(name, []).append(v)
    res["stage_seconds"] = stages
    return res


def table(results: list[dict]) -> str:
    rows = ["| algorithm | seeds | last | best | per-seed last | stage wall time (s, mean over the seeds that computed it) |",
            "|---|---|---|---|---|---|"]
    for r in results:
        last, best = r["last"], r["best"]
        stages = ", ".join(f"{k} {np.mean(v):.0f}" for k, v in r["stage_seconds"].items())
        rows.append(f"| {NAMES.get(r['algo'], r['algo'])} | {len(r['seeds'])} | {last['mean']:.1f} ± {last['std']:.1f} "
                    f"| {best['mean']:.1f} ± {best['std']:.1f} | {' / '.join(f'{v:.1f}' for v in last['per_seed'])} "
                    f"| {stages} |")
    return "\n".join(rows)


def figure(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(results):
        curves = [np.asarray(c, dtype=float) for c in r["curves"].values()]
        n = min(len(c) for c in curves)
        arr = np.stack([c[:n] for c in curves])
        mean, std = arr.mean(0), arr.std(0)
        x = np.arange(n)
        label = NAMES.get(r["algo"], r["algo"])
        if n == 1:  # BC / QGPO: one evaluation, drawn as a level across the plot
            ax.axhline(mean[0], ls="--", color=f"C{i}", label=f"{label} ({mean[0]:.1f})")
            continue
        ax.plot(x, mean, marker="o", color=f"C{i}", label=label)
        ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("QIPO round (0 = behaviour policy)")
    ax.set_ylabel("D4RL normalised score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from energyflow.files import save_figure

    save_figure(fig, path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run directories of finished offline-RL recipes")
    p.add_argument("--figure", help="write the learning curves of all runs to this PNG")
    args = p.parse_args()
    results = [load(d) for d in args.run_dirs]
    print(table(results))
    if args.figure:
        figure(results, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
