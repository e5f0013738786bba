"""The RL domain's behaviour actors (the SAC checkpoints that roll out the offline datasets) are
self-describing model files: :func:`energyflow.models.load_model` rebuilds each shipped checkpoint
as the core :class:`energyflow.nets.SquashedGaussianActor` in a process that never imports
``domains``, and it acts exactly as :func:`domains.rl.behaviour.load_actor`'s actor does.
``load_actor`` still reads the earlier ``{"actor", "meta"}`` checkpoints, and refuses broken files
of either format in one line naming the file.  Needs no rl extra (the actor is plain torch).
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from domains.rl.behaviour import SquashedGaussianActor, _export_actor, load_actor, shipped_checkpoints
from energyflow.errors import CorruptFileError, InputError, UnsafeFileError
from energyflow.models import load_model, model_record, save_model_file
from energyflow.nets import MLPField
from energyflow.nets import SquashedGaussianActor as CoreActor

NOISE_SEED = 7

# Runs in a fresh interpreter, cwd a temporary folder: rebuilds each checkpoint with the core only
# and compares its actions with those load_actor's actor took in the test process (passed in a file).
CHECK = r"""
import sys, torch
torch.set_num_threads(1)
from energyflow.models import load_model
from energyflow.nets import SquashedGaussianActor

refs = torch.load(sys.argv[1], weights_only=True)
with torch.no_grad():
    for case in refs["cases"]:
        obs = refs["obs"][:, :case["meta"]["obs_dim"]]
        model = load_model(case["file"])
        net = model.net
        assert type(net) is SquashedGaussianActor and not net.training, type(net)
        assert model.path is None and model.prediction is None and model.sample_shape is None
        assert model.meta == case["meta"], (model.meta, case["meta"])
        assert net.init_kwargs["hidden"] == case["meta"]["hidden"], net.init_kwargs
        det = net(obs, deterministic=True)
        noisy = net(obs, generator=torch.Generator().manual_seed(refs["noise_seed"]))
        assert torch.equal(det, case["deterministic"]), case["file"]
        assert torch.equal(noisy, case["stochastic"]), case["file"]
        print("same actions:", case["name"])
leaked = sorted(m for m in sys.modules if m == "domains" or m.startswith("domains."))
assert not leaked, leaked
print("domains never imported")
"""


def actions(actor, obs):
    with torch.no_grad():
        return (actor(obs, deterministic=True),
                actor(obs, generator=torch.Generator().manual_seed(NOISE_SEED)))


def small_actor(seed=0):
    torch.manual_seed(seed)
    actor = SquashedGaussianActor(11, 3, hidden=[8, 8], low=[-1.0, -2.0, -0.5], high=[1.0, 2.0, 0.5])
    meta = {"env_id": "Hopper-v5", "obs_dim": 11, "act_dim": 3, "hidden": [8, 8], "low": [-1.0, -2.0, -0.5],
            "high": [1.0, 2.0, 0.5], "seed": seed, "steps": 1000, "eval_return": 12.5}
    return actor, meta


def test_the_actor_is_the_core_registered_network():
    assert SquashedGaussianActor is CoreActor  # domains.rl.behaviour re-exports the core class
    actor, _ = small_actor()
    assert actor.registered_name == "energyflow.SquashedGaussianActor"
    assert sorted(actor.state_dict()) == ["high", "latent_pi.0.bias", "latent_pi.0.weight", "latent_pi.2.bias",
                                          "latent_pi.2.weight", "log_std.bias", "log_std.weight", "low", "mu.bias",
                                          "mu.weight"]  # Stable-Baselines3's names
    obs = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    det, noisy = actions(actor, obs)
    assert det.shape == noisy.shape == (5, 3) and not torch.equal(det, noisy)
    assert torch.all(noisy >= actor.low) and torch.all(noisy <= actor.high)


def test_shipped_checkpoints_load_without_the_domain_and_act_the_same(tmp_path):
    shipped = shipped_checkpoints()
    envs = {"walker2d": ("Walker2d-v5", 5), "halfcheetah": ("HalfCheetah-v5", 2), "hopper": ("Hopper-v5", 1)}
    assert {p: sum(n.startswith(p + "_") for n in shipped) for p in envs} == {p: k for p, (_, k) in envs.items()}
    obs = torch.randn(32, 17, generator=torch.Generator().manual_seed(123))  # the first obs_dim columns per env
    cases = []
    for name, path in shipped.items():
        record = torch.load(path, weights_only=True)
        assert record["format"] == "energyflow-model/1" and record["class"] == "energyflow.SquashedGaussianActor"
        assert record["init"]["hidden"] == [256, 256] and record["sample_shape"] is None
        actor, meta = load_actor(name)
        assert meta == record["meta"] and meta["env_id"] == envs[name.split("_")[0]][0]
        det, noisy = actions(actor, obs[:, :meta["obs_dim"]])
        assert not torch.equal(det, noisy)
        cases.append({"name": name, "file": str(path), "meta": meta, "deterministic": det, "stochastic": noisy})
    refs = tmp_path / "refs.pt"
    torch.save({"obs": obs, "noise_seed": NOISE_SEED, "cases": cases}, refs)
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", CHECK, str(refs)], cwd=str(work), capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("same actions:") == len(cases) and "domains never imported" in proc.stdout, proc.stdout


def test_export_writes_a_model_file_that_both_loaders_read(tmp_path):
    """``train_sac``'s export (fed an SB3-like model) writes a model record with the full meta."""
    actor, meta = small_actor(1)

    class SB3Actor(nn.Module):  # SB3's actor holds more than the three parts the export keeps
        def __init__(self):
            super().__init__()
            self.latent_pi, self.mu, self.log_std = actor.latent_pi, actor.mu, actor.log_std
            self.features_extractor = nn.Linear(2, 2)

    space = SimpleNamespace(low=np.array(meta["low"], dtype=np.float32), high=np.array(meta["high"], dtype=np.float32))
    model = SimpleNamespace(policy=SimpleNamespace(actor=SB3Actor()), action_space=space)
    partial = {k: meta[k] for k in ("env_id", "obs_dim", "act_dim", "hidden", "seed", "steps", "eval_return")}
    file = str(tmp_path / "actor_1000.pt")
    _export_actor(model, file, partial)
    record = torch.load(file, weights_only=True)
    assert record["format"] == "energyflow-model/1" and record["meta"] == meta and record["path"] is None
    assert record["init"] == {"obs_dim": 11, "act_dim": 3, "hidden": [8, 8], "low": meta["low"],
                              "high": meta["high"]}
    assert "features_extractor.weight" not in record["state_dict"]
    obs = torch.randn(6, 11, generator=torch.Generator().manual_seed(2))
    want = actions(actor, obs)
    loaded, got_meta = load_actor(file)
    assert got_meta == meta
    for got in (actions(loaded, obs), actions(load_model(file).net, obs)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_legacy_checkpoints_still_load(tmp_path):
    actor, meta = small_actor(2)
    legacy = tmp_path / "legacy.pt"
    torch.save({"actor": actor.state_dict(), "meta": meta}, legacy)
    current = save_model_file(tmp_path / "current.pt", actor, meta=meta)
    obs = torch.randn(6, 11, generator=torch.Generator().manual_seed(3))
    (old, old_meta), (new, new_meta) = load_actor(str(legacy)), load_actor(current)
    assert old_meta == new_meta == meta and not old.training
    for got in (actions(old, obs), actions(new, obs)):
        assert all(torch.equal(g, w) for g, w in zip(got, actions(actor, obs)))
    with pytest.raises(CorruptFileError, match="not a self-describing"):  # the core reads only model files
        load_model(legacy)


def test_broken_actor_files_are_refused_in_one_line_naming_the_file(tmp_path):
    actor, meta = small_actor(3)
    record = model_record(actor, meta=meta)
    nan = {**record, "state_dict": {**record["state_dict"], "mu.bias": torch.full((3,), float("nan"))}}
    cases = {
        "nan.pt": (nan, CorruptFileError, "NaN or infinite weights"),
        "bad-meta.pt": ({**record, "meta": {**meta, "low": [-1.0]}}, CorruptFileError, r"meta\['low'\]"),
        "no-meta.pt": ({**record, "meta": None}, CorruptFileError, "'meta' must be a dict"),
        "init-vs-meta.pt": ({**record, "meta": {**meta, "hidden": [8]}}, CorruptFileError, "does not fit meta"),
        "bad-weights.pt": ({**record, "init": {**record["init"], "hidden": [16, 8]}}, CorruptFileError,
                           "cannot rebuild energyflow.SquashedGaussianActor"),
        "other-class.pt": (model_record(MLPField(2, hidden=8, depth=1), meta=meta), CorruptFileError,
                           "not of a behaviour actor"),
        "unregistered.pt": ({**record, "class": "os.system"}, CorruptFileError, "not of a behaviour actor"),
        "other-format.pt": ({**record, "format": "energyflow-model/99"}, CorruptFileError, "not a self-describing"),
        "legacy-nan.pt": ({"actor": nan["state_dict"], "meta": meta}, CorruptFileError, "NaN or infinite weights"),
        "neither.pt": ({"weights": record["state_dict"]}, CorruptFileError, r"energyflow model file .* or hold"),
        "unsafe.pt": ({**record, "extra": SquashedGaussianActor}, UnsafeFileError, "refusing"),
    }
    for name, (obj, error, pattern) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(error, match=pattern) as info:
            load_actor(str(tmp_path / name))
        message = str(info.value)
        assert isinstance(info.value, InputError) and name in message and "\n" not in message, message
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(save_model_file(tmp_path / "whole.pt", actor, meta=meta), "rb").read()[:2000])
    with pytest.raises(CorruptFileError, match="truncated.pt"):
        load_actor(str(truncated))
