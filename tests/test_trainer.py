"""Trainer: exact resume after a hard kill, data-parallel (torchrun, gloo) equivalence, logs, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from energyflow.data import FunctionBatchSource, TensorBatchSource
from energyflow.losses import FlowMatchingLoss
from energyflow.nets import MLPField
from energyflow.paths import CondOTPath
from energyflow.trainer import Trainer, TrainerConfig

SCRIPT = os.path.join(os.path.dirname(__file__), "_toy_train.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    by_step = {}
    for r in rows:
        if "train/loss" in r:
            by_step[r["step"]] = r["train/loss"]
    return [by_step[k] for k in sorted(by_step)]


def _states_equal(a, b, atol=0.0):
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


@pytest.mark.slow
def test_resume_after_hard_kill_matches_uninterrupted_run(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    _run([sys.executable, SCRIPT, str(full), "40"])
    proc = _run([sys.executable, SCRIPT, str(crashed), "40", "--crash-at", "25"], check=False)
    assert proc.returncode == 3, proc.stderr
    assert not (crashed / "rank0.pt").exists()
    ckpt = torch.load(crashed / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 20  # the last periodic checkpoint before the kill
    _run([sys.executable, SCRIPT, str(crashed), "40"])  # resumes from step 20
    a = torch.load(full / "rank0.pt")
    b = torch.load(crashed / "rank0.pt")
    assert _states_equal(a["model"], b["model"]) and _states_equal(a["ema"], b["ema"])
    # the log reads as one run: the records the killed run wrote past its checkpoint were dropped
    with open(crashed / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
    assert steps == list(range(1, 41))
    assert _losses(full) == pytest.approx(_losses(crashed), rel=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, str(ddp), "30"])
    _run([sys.executable, SCRIPT, str(single), "30"])
    r0, r1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    assert _states_equal(r0["model"], r1["model"]), "ranks ended with different weights"
    one = torch.load(single / "rank0.pt")
    # Same global batch, same noise: the energy-weighted loss curve and the weights agree
    # up to float32 reduction-order differences.
    l_ddp, l_single = _losses(ddp), _losses(single)
    assert len(l_ddp) == len(l_single) == 30
    assert l_ddp == pytest.approx(l_single, rel=1e-4, abs=1e-6)
    assert _states_equal(r0["model"], one["model"], atol=1e-4)


def test_trainer_logs_jsonl_and_tensorboard_and_uses_ema(tmp_path):
    torch.manual_seed(0)
    net = MLPField(2, hidden=16, depth=1)
    data = TensorBatchSource({"x1": torch.randn(512, 2) + 3.0})
    calls = []

    def hook(trainer):
        calls.append(trainer.step)
        return {"probe": 1.0}

    cfg = TrainerConfig(steps=20, batch_size=64, log_every=5, eval_every=10, progress=False, device="cpu",
                        ema_decay=0.5)
    trainer = Trainer(net, FlowMatchingLoss(CondOTPath()), data, cfg, out_dir=str(tmp_path), hooks=[hook])
    result = trainer.fit()
    assert result.step == 20 and calls == [10, 20]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20]
    assert any(r.get("eval/probe") == 1.0 for r in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    ema = trainer.ema_module.state_dict()
    assert not _states_equal(ema, trainer.model.state_dict())  # the EMA lags the model
    # the loss went down
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]


def test_trainer_rejects_non_finite_loss(tmp_path):
    net = MLPField(2, hidden=8, depth=1)
    data = FunctionBatchSource(lambda n, g: torch.full((n, 2), float("nan")))
    trainer = Trainer(net, FlowMatchingLoss(CondOTPath()), data,
                      TrainerConfig(steps=3, batch_size=8, progress=False, device="cpu", tensorboard=False))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.fit()


def test_trainer_checks_group_divisibility():
    from energyflow.losses import EnergyWeightedLoss

    net = MLPField(2, hidden=8, depth=1)
    data = TensorBatchSource({"x1": torch.randn(10, 2)})
    with pytest.raises(ValueError, match="whole groups"):
        Trainer(net, EnergyWeightedLoss(CondOTPath(), 1.0, group_size=16), data,
                TrainerConfig(steps=1, batch_size=40, device="cpu"))


def _flat(state):
    """Every tensor of a (nested) state dict, flattened in a stable order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _flat(state[k])]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_signal_mid_step_resumes_bit_identically(tmp_path, sig):
    """SIGTERM / SIGINT arriving inside a step: the trainer finishes that step, checkpoints at the
    boundary and exits; the resumed run ends with exactly the weights, EMA and optimiser state of an
    uninterrupted run (the checkpoint period, 1000, is never reached)."""
    script = os.path.join(os.path.dirname(__file__), "_signal_train.py")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    _run([sys.executable, script, str(full), "30"])
    proc = _run([sys.executable, script, str(stopped), "30", "--signal-at", "13", "--signal", sig], check=False)
    assert proc.returncode != 0 and "stopping after this step" in proc.stderr
    assert not (stopped / "final.pt").exists()
    from energyflow.files import load_torch

    assert load_torch(stopped / "checkpoint.pt")["step"] == 13  # the step in flight was completed
    _run([sys.executable, script, str(stopped), "30"])
    a, b = torch.load(full / "final.pt"), torch.load(stopped / "final.pt")
    for x, y in zip(_flat(a), _flat(b), strict=True):
        assert torch.equal(x, y)


def test_trainer_config_rejects_bad_values_with_the_setting_named():
    from energyflow.errors import InputError

    for bad, key in [({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"steps": "abc"}, "steps"),
                     ({"batch_size": 0}, "batch_size"), ({"log_every": 0}, "log_every"),
                     ({"lr": float("nan")}, "lr"), ({"lr": -1.0}, "lr"), ({"ema_decay": 1.0}, "ema_decay"),
                     ({"grad_clip": float("inf")}, "grad_clip"), ({"lr_schedule": "linear"}, "lr_schedule"),
                     ({"adam_betas": [0.9]}, "adam_betas"), ({"num_threads": 0}, "num_threads"),
                     ({"progress": "yes"}, "progress"), ({"stepz": 3}, "stepz")]:
        with pytest.raises(InputError, match=key):
            TrainerConfig.from_dict(bad, where="experiment.trainer")
    assert TrainerConfig(steps=1e3).steps == 1000 and TrainerConfig(num_threads="auto").num_threads == "auto"


def test_resume_refuses_a_checkpoint_with_other_settings(tmp_path):
    from energyflow.errors import InputError

    def trainer(**cfg):
        torch.manual_seed(0)
        return Trainer(MLPField(2, hidden=8, depth=1), FlowMatchingLoss(CondOTPath()),
                       TensorBatchSource({"x1": torch.randn(64, 2)}),
                       TrainerConfig(**{"steps": 4, "batch_size": 16, "progress": False, "device": "cpu",
                                        "tensorboard": False, **cfg}), out_dir=str(tmp_path))

    trainer().fit()
    assert trainer(log_every=1, progress=True).fit().step == 4  # logging settings may differ
    with pytest.raises(InputError, match=r"lr: 0\.001 -> 0\.01"):
        trainer(lr=1e-2).fit()


def test_low_ess_is_reported_and_warned_once(tmp_path, capsys):
    from energyflow.energies import FunctionEnergy
    from energyflow.losses import EnergyWeightedLoss

    torch.manual_seed(0)
    data = TensorBatchSource({"x1": torch.randn(4096, 2)})
    loss = EnergyWeightedLoss(CondOTPath(), beta=20.0, energy=FunctionEnergy(lambda x: x[:, 0]))
    cfg = TrainerConfig(steps=4, batch_size=256, log_every=2, progress=False, device="cpu", tensorboard=False)
    Trainer(MLPField(2, hidden=8, depth=1), loss, data, cfg, out_dir=str(tmp_path)).fit()
    err = capsys.readouterr().err
    assert err.count("effective sample size") == 1
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["train/ess_warning"] == 1.0 and r["train/ess_fraction"] < 0.01 for r in rows if "train/loss" in r)
