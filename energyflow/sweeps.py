"""Sweeps: ``energyflow run RECIPE --multirun key=a,b,c ...`` through Hydra's multirun.

Hydra expands the sweep (comma lists, ``range(...)``, ``choice(...)``; with
``hydra/sweeper=optuna``, a search) and its *launcher* runs the points: the basic launcher (one
after the other, in this process) by default, ``hydra/launcher=joblib`` for parallel processes on
one machine (``pip install hydra-joblib-launcher``), ``hydra/launcher=submitit_slurm`` for a SLURM
cluster (``pip install hydra-submitit-launcher``).  Every point is an ordinary run directory
``<sweep_dir>/<k>/`` (config.yaml, results.json, …; Hydra's own record in ``.hydra/``), and the
sweep directory gets ``summary.csv`` and ``summary.png``: each point's overrides and headline results.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from typing import Any, Callable, Sequence

from .errors import InputError

__all__ = ["run_multirun", "flatten_numbers", "write_summary", "point_dirs", "point_overrides"]


def flatten_numbers(results: Any, prefix: str = "", depth: int = 4) -> dict[str, float]:
    """The numeric leaves of a nested results dict, keyed ``a/b/c`` (``depth`` levels at most)."""
    out: dict[str, float] = {}
    if isinstance(results, dict) and depth > 0:
        for k, v in results.items():
            out.update(flatten_numbers(v, f"{prefix}{k}/", depth - 1))
    elif isinstance(results, (int, float)) and not isinstance(results, bool):
        out[prefix.rstrip("/")] = float(results)
    return out


def point_dirs(sweep_dir: str) -> list[str]:
    """The sweep's run directories ``<sweep_dir>/<k>/``, in point order."""
    dirs = [d for d in os.listdir(sweep_dir) if d.isdigit() and os.path.isdir(os.path.join(sweep_dir, d))]
    return [os.path.join(sweep_dir, d) for d in sorted(dirs, key=int)]


def point_overrides(point_dir: str) -> list[str]:
    """The command-line overrides of one sweep point (Hydra's ``.hydra/overrides.yaml``, without
    Hydra's own ``hydra.*`` keys); empty when the point has none recorded."""
    import yaml

    path = os.path.join(point_dir, ".hydra", "overrides.yaml")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [str(o) for o in (yaml.safe_load(f) or []) if not str(o).startswith("hydra")]


def write_summary(sweep_dir: str, headline: Callable[[dict], dict[str, float]], swept: Sequence[str] = ()) -> list[dict]:
    """Collect every point's overrides and ``headline(results)`` into ``summary.csv`` and a figure."""
    from .files import atomic_open, read_json

    rows = []
    for point in point_dirs(sweep_dir):
        overrides = dict(o.split("=", 1) for o in point_overrides(point) if "=" in o)
        results_file = os.path.join(point, "results.json")
        metrics = headline(read_json(results_file, "results")) if os.path.isfile(results_file) else {}
        rows.append({"point": os.path.basename(point), **overrides, **metrics})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(os.path.join(sweep_dir, "summary.csv"), "w") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot_summary(rows, [k for k in keys if k in swept], os.path.join(sweep_dir, "summary.png"))
    return rows


def _plot_summary(rows: list[dict], swept: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import save_figure

    metrics = [k for k in (rows[0] if rows else {}) if k != "point" and k not in swept and isinstance(rows[0][k], float)]
    metrics = metrics[:12]
    if not metrics:
        return
    x_key = swept[0] if swept else "point"
    try:
        xs = [float(r[x_key]) for r in rows]
    except (KeyError, ValueError):
        xs = list(range(len(rows)))
    others = swept[1:]
    cols = min(3, len(metrics))
    fig, axes = plt.subplots(math.ceil(len(metrics) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(metrics) / cols)),
                             squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        groups: dict[str, list[tuple[float, float]]] = {}
        for x, r in zip(xs, rows):
            label = ", ".join(f"{k}={r.get(k)}" for k in others) or None
            if metric in r:
                groups.setdefault(label or "", []).append((x, r[metric]))
        for label, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
        ax.set_title(metric, fontsize=8)
        ax.set_xlabel(x_key, fontsize=8)
        if len(groups) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def run_multirun(recipe: str, overrides: Sequence[str], sweep_dir: str,
                 run_point: Callable[[Any, str], dict[str, Any]]) -> list[str]:
    """Run the sweep of ``recipe`` with Hydra's multirun; ``run_point(cfg, run_dir)`` runs one point
    (in this process or, with another launcher, in a worker).  Returns the swept keys; each point's
    ``config.yaml`` and ``results.json`` are on disk for :func:`write_summary`."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = os.path.abspath(recipe)
    folder, name = os.path.split(path)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # Hydra's grammar errors
        raise InputError(f"cannot parse the sweep overrides {list(overrides)}: {err}") from None
    swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]  # none: a one-point sweep, as in Hydra

    @hydra.main(config_path=folder, config_name=os.path.splitext(name)[0], version_base=None)
    def task(cfg) -> None:
        run_dir = HydraConfig.get().runtime.output_dir
        run_point(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), run_dir)  # without the hydra node

    hydra_args = [f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}", "hydra.job.chdir=False",
                  "hydra/job_logging=none", "hydra/hydra_logging=none"]
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], "--multirun", *overrides, *hydra_args]
    try:
        task()
    finally:
        sys.argv = saved_argv
    return swept
