"""Figures for the toy experiment: one row per β, columns data / exact target / each method."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

__all__ = ["plot_toy_grid"]

_TITLES = {"efm_ot": "EFM (OT path)", "efm_vp": "EFM (VP path)", "fm_ot": "unweighted FM",
           "guidance": "energy-gradient guidance", "cep": "QGPO (CEP guidance)"}


def plot_toy_grid(rows: Sequence[tuple[float, Any, Tensor, dict[str, Tensor]]], data: Tensor, out_path: str,
                  title: str = "", extent: float = 5.0) -> str:
    """Save a grid: for each ``(beta, target, exact_samples, {method: samples})`` row, the data,
    the exact target density, and each method's samples.  Returns ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(rows[0][3])
    data = data.detach().cpu().numpy()
    ncols = 2 + len(methods)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.3 * ncols, 2.3 * len(rows)), squeeze=False)
    lim = (-extent, extent)
    for r, (beta, target, _exact, samples) in enumerate(rows):
        ax = axes[r][0]
        ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.4, color="0.3")
        ax.set_title("data p" if r == 0 else "")
        ax.set_ylabel(f"β = {beta:g}")
        grid = target.density_grid(extent=extent, resolution=160)
        axes[r][1].imshow(grid.density.numpy(), origin="lower",
                          extent=(-extent, extent, -extent, extent), cmap="magma")
        axes[r][1].set_title("exact q ∝ p·exp(−βE)" if r == 0 else "")
        for c, m in enumerate(methods):
            x = samples[m].detach().cpu().numpy()
            ax = axes[r][2 + c]
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color="C0" if m.startswith("efm") else "C3")
            ax.set_title(_TITLES.get(m, m) if r == 0 else "", fontsize=9)
        for ax in axes[r]:
            ax.set_xlim(lim)
            ax.set_ylim(lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from energyflow.files import save_figure

    save_figure(fig, out_path, dpi=90)
    plt.close(fig)
    return out_path
