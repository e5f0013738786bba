"""The image domain end to end: every algo runs a few steps from the recipe, bad combinations are
refused before any work, sampling writes a grid, and the stage cache is keyed by what changes a model."""
import json
import os

import pytest
import torch

for _module in ("diffusers", "torchvision", "torchmetrics", "sklearn"):
    pytest.importorskip(_module)

from energyflow.cli import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "image_digits.yaml")
ALL = "algo=[efm,efm_vp,efm_resampled,unguided,classifier_guidance,cfg,iterative]"
TINY = [
    "experiment.trainer.steps=2", "experiment.classifier.steps=2", "experiment.evaluator.steps=2",
    "experiment.iterative.steps=2", "experiment.iterative.num_samples=32", "experiment.num_eval_samples=16",
    "experiment.sampler.steps=2", "experiment.trainer.progress=false", "device=cpu", "beta=[1,3]",
]


@pytest.mark.slow
def test_every_algo_runs_samples_and_reuses_its_stages(tmp_path, capsys):
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    args = ["run", RECIPE, ALL, *TINY, f"experiment.cache_dir={cache}", "--run-dir", str(run_dir)]
    assert main(args) == 0
    results = json.loads((run_dir / "results.json").read_text())
    methods = {(r["method"], r["beta"]) for r in results["rows"]}
    assert methods == {(a, b) for a in ("efm", "efm_vp", "efm_resampled", "unguided", "classifier_guidance", "cfg",
                                        "iterative") for b in (1.0, 3.0)}
    for row in results["rows"]:
        assert 0.0 <= row["target_rate"] <= 1.0 and row["frechet"] >= 0 and row["nfe"] > 0
        assert row["seconds_per_image"] > 0
    assert results["reference"]["real"]["count"] > 0 and "class_only" in results["reference"]
    assert results["training"]["efm_beta3"]["ess_fraction"] is not None
    assert [r["beta"] for r in results["training"]["iterative"]["rounds"]] == [1.0, 3.0]
    assert (run_dir / "grids" / "efm_beta3.png").exists() and (run_dir / "beta_sweep.png").exists()
    # a second run in another run directory with the same cache trains nothing
    stamps = {p: p.stat().st_mtime for p in cache.glob("*/model.pt")}
    assert len(stamps) == len(results["training"]) - 1  # every stage but the iterative chain has a model.pt
    capsys.readouterr()
    assert main(["run", RECIPE, ALL, *TINY, f"experiment.cache_dir={cache}", "--run-dir", str(tmp_path / "again")]) == 0
    assert {p: p.stat().st_mtime for p in cache.glob("*/model.pt")} == stamps
    # another beta trains only that beta's models; the classifiers and the unguided model are reused
    assert main(["run", RECIPE, "algo=efm", *TINY[:-1], "beta=[5]", f"experiment.cache_dir={cache}",
                 "--run-dir", str(tmp_path / "beta5")]) == 0
    new = set(cache.glob("*/model.pt")) - set(stamps)
    assert {p.parent.name.split("-")[0] for p in new} == {"efm_beta5"}
    # sampling a run directory writes the samples and a grid
    out = tmp_path / "cfg.pt"
    capsys.readouterr()
    assert main(["sample", str(run_dir), "-m", "cfg_beta3", "-n", "9", "--steps", "2", "-o", str(out)]) == 0
    assert torch.load(out).shape == (9, 1, 8, 8)
    assert (tmp_path / "cfg.png").exists()


@pytest.mark.parametrize("overrides, message", [
    (["energy=jpeg", "algo=classifier_guidance"], "black-box JPEG size"),
    (["energy=classifier+jpeg", "algo=cfg"], "black-box JPEG size"),
    (["algo=cfg", "target=[3,5]"], "single target"),
    (["algo=dreaming"], "unknown method"),
    (["energy=entropy"], "not a sum of distinct energies"),
    (["beta=-1"], "beta must be"),
    (["target=12"], "do not exist"),
    (["experiment.dataset=imagenet"], "unknown image data set"),
    (["experiment.net.preset=tpu"], "preset"),
    (["experiment.evaluator.arch=conv", "experiment.evaluator.seed_offset=0"], "must differ"),
    (["experiment.jpeg.quality=200", "energy=jpeg"], "experiment.jpeg.quality"),
])
def test_bad_combinations_are_refused_in_one_line(overrides, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", RECIPE, *TINY, *overrides, f"experiment.cache_dir={tmp_path / 'cache'}",
                 "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "cache").exists()  # refused before any work
