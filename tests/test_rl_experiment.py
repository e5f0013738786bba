"""The offline-RL experiment end to end on tiny data: every algorithm, shared cached stages,
resume after a hard kill mid-stage, and refusal of a dataset made for another environment."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("minari")
from domains.rl.experiment import OfflineRLExperiment  # noqa: E402
from energyflow.cli import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINTS = next(d for d in (os.path.join(ROOT, "domains", "rl", "behaviour_checkpoints"),
                                os.path.join(ROOT, "assets", "behaviour")) if os.path.isdir(d))
ACTORS = [os.path.join(CHECKPOINTS, f"walker2d_sac_{k}.pt") for k in ("020k", "100k", "200k")]
TINY_QIPO = {"hidden": 32, "depth": 2, "num_support": 4, "critic_hidden": 32,
             "behaviour": {"steps": 30, "batch_size": 64}, "critic": {"steps": 30, "batch_size": 64},
             "critic_states": 256, "rounds": 2, "round_steps": 5, "round_states": 64,
             "round_trainer": {"batch_size": 64}, "qgpo": {"steps": 10, "batch_size": 64, "hidden": 32, "depth": 2},
             "onestep": {"steps": 5, "batch_size": 64}}


def tiny(algo, cache, **kw):
    return OfflineRLExperiment(env_id="Walker2d-v5", dataset="default", algo=algo, qipo=TINY_QIPO, seeds=[0, 1],
                               eval_episodes=2, cache_dir=str(cache), progress=False, device="cpu",
                               default_dataset={"id": "energyflow/test-walker-v0", "actors": ACTORS,
                                                "steps_per_actor": [100, 100, 100]}, **kw)


@pytest.mark.slow
def test_all_algorithms_share_cached_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    cache = tmp_path / "cache"
    results = {}
    for algo in ("qipo_ot", "bc", "qipo_diff", "qgpo", "qipo_onestep"):
        run_dir = tmp_path / algo
        run_dir.mkdir()
        experiment = tiny(algo, cache)
        results[algo] = experiment.run(str(run_dir))
        if algo in ("qipo_ot", "qgpo", "qipo_onestep"):  # `energyflow eval`: reloading the final policy reproduces the last score
            again = experiment.evaluate(str(run_dir))
            assert [again["per_seed"][str(s)]["normalized_score"] for s in (0, 1)] == results[algo]["last"]["per_seed"]
        assert (run_dir / "learning_curve.png").exists()
        assert (run_dir / "seed1" / "evals.jsonl").exists()
        r = results[algo]
        assert set(r["last"]) == {"mean", "std", "per_seed"} and len(r["best"]["per_seed"]) == 2
        assert all(b >= l for b, l in zip(r["best"]["per_seed"], r["last"]["per_seed"]))
    # QIPO-OT: 3 evaluations per seed (behaviour + 2 renewals); BC = QIPO-OT's round 0, same cached model
    assert len(results["qipo_ot"]["curves"]["0"]) == 3
    assert results["bc"]["last"]["per_seed"] == [c[0] for c in results["qipo_ot"]["curves"].values()]
    # the one-step policy: QIPO-OT's cached rounds, then one more record (the distilled policy)
    for seed, curve in results["qipo_onestep"]["curves"].items():
        assert len(curve) == 4 and curve[:3] == results["qipo_ot"]["curves"][seed]
    assert len([d for d in os.listdir(cache) if d.startswith("rounds-")]) == 4  # ot and vp × 2 seeds
    student = torch.load(tmp_path / "qipo_onestep" / "seed0" / "policy.pt", weights_only=True)
    assert student["meta"]["sampler"] == {"name": "euler", "steps": 1} and student["meta"]["distilled_from_round"] == 2
    behaviour_dirs = [d for d in os.listdir(cache) if d.startswith("behaviour-")]
    assert len(behaviour_dirs) == 4  # (ot, vp) × 2 seeds: BC reused QIPO-OT's, QGPO reused QIPO-Diff's
    assert len([d for d in os.listdir(cache) if d.startswith("qgpo_energy-")]) == 2
    # benchmarks/rl_table.py: the README's table and comparison figure from these run directories
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import rl_table

    loaded = [rl_table.load(str(tmp_path / algo)) for algo in ("qipo_ot", "bc", "qipo_diff", "qgpo")]
    text = rl_table.table(loaded)
    r = results["qipo_ot"]["last"]
    assert f"| QIPO-OT | 2 | {r['mean']:.1f} ± {r['std']:.1f} |" in text and "| QGPO | 2 |" in text
    # stage wall times: each stage's own compute time (from its done.json), recorded in summary.json
    # so the run directory needs no cache (no absolute stage paths)
    summary = json.loads((tmp_path / "qipo_ot" / "seed0" / "summary.json").read_text())
    assert set(summary["stage_compute_seconds"]) == {"behaviour", "critic", "rounds"}
    assert all(v > 0 for v in summary["stage_compute_seconds"].values())
    assert not any(os.path.isabs(v) for v in summary["stages"].values())
    rl_table.figure(loaded, str(tmp_path / "compare.png"))
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_a_dataset_for_another_environment_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    from domains.rl.datasets import create_minari_dataset, rollout

    episodes = rollout(None, "Hopper-v5", 50, seed=0)
    create_minari_dataset("energyflow/hopper-tiny-v0", episodes, "Hopper-v5")
    code = main(["run", os.path.join(ROOT, "recipes", "qipo_walker.yaml"), "dataset=energyflow/hopper-tiny-v0",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "(11,)" in err and "(17,)" in err  # Hopper's observations vs Walker2d's


@pytest.mark.slow
def test_recipe_resumes_after_a_hard_kill_mid_stage(tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari"), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "energyflow", "run", os.path.join(ROOT, "recipes", "qipo_walker.yaml"),
            "--run-dir", str(tmp_path / "run"), "device=cpu", "experiment.progress=false",
            "experiment.default_dataset.id=energyflow/test-walker-v0",
            "experiment.default_dataset.steps_per_actor=[60,60,60,60,60,60]", "experiment.qipo.hidden=32",
            "experiment.qipo.critic_hidden=32", "experiment.qipo.behaviour.steps=3000",
            "+experiment.qipo.checkpoint_every=50", "experiment.qipo.critic.steps=20",
            "experiment.qipo.critic_states=128", "experiment.qipo.rounds=1", "experiment.qipo.round_steps=5",
            "experiment.qipo.round_states=32", "experiment.eval_episodes=2"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cache = tmp_path / "cache"
    deadline = time.time() + 120
    ckpt = None
    while time.time() < deadline and proc.poll() is None:  # wait for the behaviour stage's first checkpoint
        found = [d for d in (os.listdir(cache) if cache.exists() else []) if d.startswith("behaviour-")]
        if found and (cache / found[0] / "checkpoint.pt").exists():
            ckpt = cache / found[0] / "checkpoint.pt"
            break
        time.sleep(0.2)
    assert ckpt is not None, "the behaviour stage never checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt.parent / "done.json").exists()
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout + out.stderr
    assert (ckpt.parent / "done.json").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["algo"] == "qipo_ot"


def test_data_commands_make_and_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assert main(["data", "make", "energyflow/cli-walker-v0", "--actors", *ACTORS[:2], "--steps-per-actor", "40"]) == 0
    assert "80 steps" in capsys.readouterr().out
    assert main(["data", "list"]) == 0
    assert "energyflow/cli-walker-v0" in capsys.readouterr().out
    # refuses to overwrite, with a clear message
    assert main(["data", "make", "energyflow/cli-walker-v0", "--actors", ACTORS[0], "--steps-per-actor", "40"]) == 2
    assert "exists" in capsys.readouterr().err
    # a missing dataset fails fast and says how to create it
    assert main(["run", os.path.join(ROOT, "recipes", "qipo_walker.yaml"), "dataset=energyflow/nope-v0",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "energyflow data" in capsys.readouterr().err


# -- hardening: inputs checked at construction, self-contained run directories -------------------------
import math  # noqa: E402
import shutil  # noqa: E402

from energyflow.errors import InputError  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "qipo_walker.yaml")
TINY_OVERRIDES = ["device=cpu", "experiment.progress=false", "experiment.default_dataset.id=energyflow/test-walker-v0",
                  "experiment.default_dataset.steps_per_actor=[60,60,60,60,60,60]", "experiment.qipo.hidden=32",
                  "experiment.qipo.critic_hidden=32", "experiment.qipo.behaviour.steps=20",
                  "experiment.qipo.critic.steps=20", "experiment.qipo.critic_states=128", "experiment.qipo.rounds=1",
                  "experiment.qipo.round_steps=5", "experiment.qipo.round_states=32", "experiment.qipo.qgpo.steps=5",
                  "experiment.qipo.qgpo.hidden=16", "experiment.eval_episodes=2"]


@pytest.mark.parametrize("override, key", [
    ("beta=-1", "experiment.qipo.beta"), ("beta=nan", "experiment.qipo.beta"), ("beta=inf", "experiment.qipo.beta"),
    ("experiment.qipo.rounds=-1", "experiment.qipo.rounds"), ("+experiment.qipo.bogus=1", "bogus"),
    ("experiment.qipo.round_steps=0", "experiment.qipo.round_steps"),
    ("experiment.qipo.behaviour.lr=-1", "experiment.qipo.behaviour"),
    ("experiment.eval_episodes=0", "experiment.eval_episodes"), ("experiment.reward_scale=0", "experiment.reward_scale"),
    ("experiment.reward_scale=nan", "experiment.reward_scale"), ("experiment.seeds=[0,0]", "experiment.seeds"),
    ("experiment.seeds=[a]", "experiment.seeds"), ("algo=ppo", "experiment.algo"),
])
def test_bad_inputs_are_refused_before_any_data_or_training(tmp_path, monkeypatch, capsys, override, key):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assert main(["run", RECIPE, override, "--run-dir", str(tmp_path / "runs" / "run")]) == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "minari").exists() and not (tmp_path / "runs" / "cache").exists()  # nothing built or trained


def test_construction_checks_every_setting_in_python_too():
    with pytest.raises(InputError, match=r"experiment\.qipo\.beta must be a finite number >= 0, got nan"):
        OfflineRLExperiment(qipo={"beta": math.nan})
    with pytest.raises(InputError, match=r"experiment\.qipo\.seed is set from experiment\.seeds"):
        OfflineRLExperiment(qipo={"seed": 3})
    with pytest.raises(InputError, match=r"experiment\.eval_episodes"):
        OfflineRLExperiment(eval_episodes=2.5)


def test_evaluate_checks_the_run_directory_is_writable_before_any_work(tmp_path, monkeypatch):
    import domains.rl.experiment as rl_experiment

    experiment = OfflineRLExperiment()
    monkeypatch.setattr(experiment, "load_data", lambda: pytest.fail("evaluate loaded data before checking"))
    monkeypatch.setattr(rl_experiment, "check_writable", lambda folder, what="folder": (_ for _ in ()).throw(
        InputError(f"cannot write to {what} {folder}: Read-only file system")))
    with pytest.raises(InputError, match="Read-only"):
        experiment.evaluate(str(tmp_path))
    if os.geteuid() != 0:  # a real read-only folder (root may write anyway)
        monkeypatch.undo()
        monkeypatch.setattr(experiment, "load_data", lambda: pytest.fail("evaluate loaded data before checking"))
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        try:
            with pytest.raises(InputError, match="cannot write"):
                experiment.evaluate(str(tmp_path / "ro"))
        finally:
            os.chmod(tmp_path / "ro", 0o755)


@pytest.mark.slow
def test_a_copied_run_directory_evaluates_without_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    original, moved = tmp_path / "original", tmp_path / "moved"
    last = {}
    for algo in ("qipo_ot", "qgpo"):
        assert main(["run", RECIPE, f"algo={algo}", *TINY_OVERRIDES, "--run-dir", str(original / algo)]) == 0
        last[algo] = json.loads((original / algo / "results.json").read_text())["last"]["per_seed"]
        summary = (original / algo / "seed0" / "summary.json").read_text()
        assert str(tmp_path) not in summary and '"final_policy": "seed0/policy.pt"' in summary  # no absolute paths
        shutil.copytree(original / algo, moved / algo)
    shutil.rmtree(original)  # the runs and their stage cache are gone
    capsys.readouterr()
    for algo in ("qipo_ot", "qgpo"):
        assert main(["eval", str(moved / algo)]) == 0, capsys.readouterr().err
        again = json.loads((moved / algo / "eval.json").read_text())
        assert [again["per_seed"]["0"]["normalized_score"]] == last[algo]
    assert not (tmp_path / "original").exists()  # evaluation never touched the old cache location

    # a damaged or crafted final policy: one line naming the file, exit code 2, nothing executed
    policy = moved / "qipo_ot" / "seed0" / "policy.pt"
    blob = policy.read_bytes()
    policy.write_bytes(blob[: len(blob) // 3])
    capsys.readouterr()
    assert main(["eval", str(moved / "qipo_ot")]) == 2
    err = capsys.readouterr().err
    assert str(policy) in err and len(err.strip().splitlines()) == 1, err
    marker = tmp_path / "executed"
    policy.write_bytes(b"")
    energy = moved / "qgpo" / "seed0" / "qgpo_energy.pt"
    import torch

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"body.inp.weight": Payload()}, energy)
    assert main(["eval", str(moved / "qgpo")]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and str(energy) in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def test_scores_are_normalised_by_d4rl_references_whatever_the_dataset_says():
    from types import SimpleNamespace

    from domains.rl.datasets import REF_SCORES

    data = SimpleNamespace(ref_min_score=0.0, ref_max_score=100.0)  # e.g. a Minari dataset's own references
    walker = OfflineRLExperiment(env_id="Walker2d-v5", algo="bc")
    assert walker.reference_scores(data) == REF_SCORES["Walker2d"]
    other = OfflineRLExperiment(env_id="Pendulum-v1", algo="bc")  # D4RL has no references: the dataset's
    assert other.reference_scores(data) == (0.0, 100.0)
