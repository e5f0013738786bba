"""benchmarks/rl_ablation_table.py: a sweep's points become one Markdown row each (swept overrides,
round-0 = BC score, QIPO's last and best as mean ± std over seeds); unfinished points are shown."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import rl_ablation_table  # noqa: E402


def _point(sweep, k, overrides, curves=None):
    d = sweep / str(k)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if curves is not None:
        last = [c[-1] for c in curves.values()]
        best = [max(c) for c in curves.values()]
        (d / "results.json").write_text(json.dumps({
            "algo": "qipo_ot", "dataset": "energyflow/x-v0", "curves": curves,
            "last": {"per_seed": last}, "best": {"per_seed": best}}))


def test_table_rows(tmp_path):
    sweep = tmp_path / "sweep"
    _point(sweep, 0, ["beta=0"], {"0": [10.0, 8.0], "1": [12.0, 10.0]})
    _point(sweep, 1, ["beta=1"], {"0": [10.0, 30.0, 20.0], "1": [12.0, 40.0, 30.0]})
    _point(sweep, 2, ["beta=2"])
    text = rl_ablation_table.table(rl_ablation_table.rows([str(sweep)]), title="beta")
    assert "| beta=0 | 2 | 11.0 ± 1.0 | 9.0 ± 1.0 | 11.0 ± 1.0 |" in text
    assert "| beta=1 | 2 | 11.0 ± 1.0 | 25.0 ± 5.0 | 35.0 ± 5.0 |" in text
    assert "| beta=2 | not finished |" in text
