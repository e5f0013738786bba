"""The command line: every recipe composes and runs for a few steps; sample/eval; clear errors."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from energyflow.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))

TINY_QIPO = [
    "experiment.default_dataset.id=energyflow/test-walker-v0", "experiment.default_dataset.steps_per_actor=[60,60,60,60,60,60]",
    "experiment.qipo.behaviour.steps=20", "experiment.qipo.critic.steps=20", "experiment.qipo.critic_states=256",
    "experiment.qipo.rounds=1", "experiment.qipo.round_steps=5", "experiment.qipo.round_states=64",
    "experiment.qipo.qgpo.steps=10", "experiment.qipo.hidden=32", "experiment.qipo.critic_hidden=32",
    "experiment.eval_episodes=2", "experiment.progress=false", "device=cpu",
]
TINY_IMAGE = [
    "experiment.trainer.steps=2", "experiment.classifier.steps=2", "experiment.evaluator.steps=2",
    "experiment.iterative.steps=2", "experiment.iterative.num_samples=32", "experiment.num_eval_samples=16",
    "experiment.sampler.steps=2", "experiment.trainer.progress=false", "device=cpu", "beta=[1,3]",
    "experiment.cache_dir=null",
]
TINY = {  # per recipe: overrides that make it run in seconds
    "toy_8gaussians.yaml": [
        "experiment.trainer.steps=5", "experiment.path_trainer.vp.steps=5", "experiment.cep.steps=5",
        "experiment.betas=[1,10]", "experiment.num_eval_samples=200", "experiment.eval_repeats=1",
        "experiment.pool_size=20000", "experiment.trainer.progress=false", "experiment.trainer.device=cpu",
    ],
    "toy_iterative.yaml": [
        "experiment.base_steps=5", "experiment.round_steps=3", "experiment.oneshot_steps=5",
        "experiment.num_samples=2048", "experiment.num_eval_samples=200", "experiment.eval_repeats=1",
        "experiment.schedule=[5,10]", "+experiment.plot=false",
    ],
    "image_digits.yaml": TINY_IMAGE,
    "molecule_conformer.yaml": [
        "experiment.trainer.steps=2", "experiment.data.max_molecules=30", "experiment.evaluation.max_molecules=2",
        "experiment.sampler.steps=2", "experiment.reference.num_confs=4", "experiment.group_size=2",
        "experiment.trainer.batch_size=8", "experiment.progress=false", "experiment.evaluation.workers=1",
        "experiment.reference.workers=1", "experiment.cache_dir=null", "device=cpu",
    ],
    "molecule_qed.yaml": [
        "experiment.trainer.steps=2", "experiment.vae.steps=2", "experiment.data.max_molecules=60", "experiment.sampler.steps=2",
        "experiment.trainer.batch_size=16", "experiment.iterative.rounds=2", "experiment.iterative.num_samples=32",
        "experiment.iterative.steps=2", "experiment.evaluation.num_samples=24", "experiment.evaluation.grid=4",
        "experiment.evaluation.workers=1", "experiment.data.workers=1", "experiment.progress=false",
        "experiment.trainer.progress=false", "experiment.cache_dir=null", "device=cpu",
    ],
    "image_mnist.yaml": TINY_IMAGE,
    "qipo_walker.yaml": TINY_QIPO,
    # the recipes' own offline default: a (tiny) dataset built from the checkpoints shipped in the package
    "qipo_hopper.yaml": [*TINY_QIPO, "experiment.default_dataset.id=energyflow/test-hopper-v0",
                         "experiment.default_dataset.steps_per_actor=[150]"],
    "qipo_halfcheetah.yaml": [*TINY_QIPO, "experiment.default_dataset.id=energyflow/test-halfcheetah-v0",
                              "experiment.default_dataset.steps_per_actor=[100,100]"],
}


SETUP: dict = {}  # per recipe: what its tiny run needs first (none: every recipe works offline)


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_runs_a_few_steps(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    name = os.path.basename(recipe)
    assert name in TINY, f"add tiny overrides for {name} to TINY"
    if name.startswith("qipo"):  # the offline-RL domain needs its extra: skip cleanly without it
        for module in ("gymnasium", "minari", "mujoco"):
            pytest.importorskip(module)
    if name.startswith("image"):  # the image domain needs its extra
        for module in ("diffusers", "torchvision", "torchmetrics", "sklearn"):
            pytest.importorskip(module)
    if name.startswith("molecule"):  # the molecule domain needs its extra
        for module in ("rdkit", "torch_geometric", "selfies"):
            pytest.importorskip(module)
    if name == "image_mnist.yaml":
        from domains.image.datasets import shared_data_dir

        if shared_data_dir() is None or not (shared_data_dir() / "mnist").is_dir():
            pytest.skip("the shared MNIST split is not on this machine")
    SETUP.get(name, lambda: None)()
    run_dir = tmp_path / "run"
    assert main(["run", recipe, *TINY[name], "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "config.yaml").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results
    capsys.readouterr()


def test_toy_run_sample_eval_and_resume(tmp_path, capsys):
    recipe = os.path.join(ROOT, "recipes", "toy_8gaussians.yaml")
    run_dir = tmp_path / "toy"
    args = ["run", recipe, *TINY["toy_8gaussians.yaml"], "--run-dir", str(run_dir)]
    assert main(args) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["methods"]) == {"efm_ot", "efm_vp", "fm_ot", "guidance", "cep"}
    assert set(results["floor"]) == {"beta1", "beta10"}
    assert (run_dir / "8gaussians.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in open(run_dir / "train" / "efm_ot_beta1" / "metrics.jsonl")]
    assert rows[-1]["step"] == 5 and "train/ess" in rows[-1]
    # the resolved config is saved and re-runnable: a second run reuses every cached stage
    mtime = os.path.getmtime(run_dir / "models" / "efm_ot_beta1.pt")
    assert main(args) == 0
    assert os.path.getmtime(run_dir / "models" / "efm_ot_beta1.pt") == mtime
    # a different config in the same run directory is refused
    assert main(["run", recipe, *TINY["toy_8gaussians.yaml"], "seed=5", "--run-dir", str(run_dir)]) == 2
    assert "different config" in capsys.readouterr().err

    out = tmp_path / "s.pt"
    assert main(["sample", str(run_dir), "-m", "efm_ot_beta10", "-n", "64", "--sampler", "rk4", "--steps", "4",
                 "-o", str(out)]) == 0
    x = torch.load(out)
    assert x.shape == (64, 2) and torch.isfinite(x).all()
    assert (tmp_path / "s.png").exists()
    capsys.readouterr()
    assert main(["sample", str(run_dir), "-m", "nonsense_beta1", "-n", "4"]) == 2
    assert "model must look like" in capsys.readouterr().err
    assert main(["sample", str(run_dir), "-m", "efm_ot_beta7", "-n", "4"]) == 2
    assert "no model 'efm_ot_beta7'" in capsys.readouterr().err
    assert main(["eval", str(run_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["methods"]["efm_ot"]["beta1"]["energy_distance"] >= 0


@pytest.mark.parametrize("argv, message", [
    (["run", "recipes/does_not_exist.yaml"], "recipe not found"),
    (["run", "recipes/toy_8gaussians.yaml", "experiment.nonexistent_key=1"], "cannot"),
    (["run", "recipes/toy_8gaussians.yaml", "experiment.dataset=nope"], "unknown toy dataset"),
    (["run", "recipes/toy_8gaussians.yaml", "experiment._target_=os.path.join"], "cannot build"),
    (["sample", "/nonexistent/run"], "not a run directory"),
    (["run", "recipes/toy_8gaussians.yaml", "--run-dir", "R", "experiment.dataset=nope"], "unknown toy dataset"),
])
def test_bad_input_gives_clear_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    if "R" in argv:  # overrides after the options
        argv = [str(tmp_path / "r") if a == "R" else a for a in argv]
    elif argv[0] == "run":
        argv = [*argv, "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_is_fast_and_explains():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "energyflow", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0
    assert "run" in proc.stdout and "sample" in proc.stdout and "eval" in proc.stdout
    assert elapsed < 1.5, f"energyflow --help took {elapsed:.2f}s (torch must not be imported)"
    for cmd in ("run", "sample", "eval"):
        sub = subprocess.run([sys.executable, "-m", "energyflow", cmd, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage" in sub.stdout


TINY_DDP = ["experiment.betas=[3]", "experiment.paths=[ot]", "experiment.baselines=[]", "experiment.trainer.steps=12",
            "experiment.trainer.log_every=1", "experiment.trainer.batch_size=256", "experiment.num_eval_samples=200",
            "experiment.eval_repeats=1", "experiment.pool_size=20000", "experiment.trainer.progress=false",
            "device=cpu", "num_threads=1", "+experiment.plot=false"]


def _loss_curve(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "train" / "efm_ot_beta3" / "metrics.jsonl")]
    return [r["train/loss"] for r in rows if "train/loss" in r], rows


@pytest.mark.slow
def test_torchrun_runs_a_recipe_data_parallel_like_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m energyflow run RECIPE` (gloo): both ranks end with the same
    weights, the loss curve equals the one-process run's, and rank 0 alone writes the run directory."""
    recipe = os.path.join(ROOT, "recipes", "toy_8gaussians.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "energyflow", "run", recipe, *TINY_DDP, "--run-dir", str(ddp)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"methods"') == 1  # only rank 0 reports
    assert main(["run", recipe, *TINY_DDP, "--run-dir", str(single)]) == 0
    l_ddp, rows = _loss_curve(ddp)
    l_single, _ = _loss_curve(single)
    assert len(l_ddp) == len(l_single) == 12
    assert l_ddp == pytest.approx(l_single, rel=1e-4, abs=1e-6)
    assert [r["train/rank_weight_diff"] for r in rows if "train/rank_weight_diff" in r] == [0.0]
    assert json.loads((ddp / "results.json").read_text())["methods"]["efm_ot"]["beta3"]["energy_distance"] >= 0


def test_torchrun_refuses_experiments_that_do_not_support_it(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gymnasium")
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = os.path.join(ROOT, "recipes", "qipo_walker.yaml")
    assert main(["run", recipe, *TINY_QIPO, "--run-dir", str(tmp_path / "r")]) == 2
    assert "does not support torchrun" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_three_point_multirun_writes_three_runs_and_a_summary(tmp_path):
    import csv

    recipe = os.path.join(ROOT, "recipes", "toy_8gaussians.yaml")
    sweep = tmp_path / "sweep"
    tiny = [a for a in TINY_DDP if not a.startswith(("experiment.trainer.steps", "experiment.trainer.batch_size"))]
    tiny += ["experiment.trainer.steps=3"]
    assert main(["run", recipe, "--multirun", "experiment.trainer.batch_size=32,64,128", *tiny,
                 "--run-dir", str(sweep)]) == 0
    for k in range(3):
        assert (sweep / str(k) / "results.json").exists() and (sweep / str(k) / "config.yaml").exists()
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["experiment.trainer.batch_size"] for r in rows] == ["32", "64", "128"]
    assert all(float(r["efm_ot/beta3/ratio"]) > 0 and 0 < float(r["efm_ot_beta3/ess_fraction"]) <= 1 for r in rows)
    assert (sweep / "summary.png").stat().st_size > 1000


def test_a_multirun_without_a_swept_key_is_one_point(tmp_path):
    import csv

    recipe = os.path.join(ROOT, "recipes", "toy_8gaussians.yaml")
    sweep = tmp_path / "sweep"
    tiny = [a for a in TINY_DDP if not a.startswith("experiment.trainer.steps")] + ["experiment.trainer.steps=3"]
    assert main(["run", recipe, "--multirun", *tiny, "--run-dir", str(sweep)]) == 0
    assert (sweep / "0" / "results.json").exists() and not (sweep / "1").exists()
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 1 and float(rows[0]["efm_ot/beta3/ratio"]) > 0
