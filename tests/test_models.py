"""Self-describing model files: rebuilt without domain code, sampled from the CLI, never a way to run code."""
from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

import pytest
import torch

from energyflow.errors import CorruptFileError, UnsafeFileError
from energyflow.experiment import save_model
from energyflow.models import load_model, model_record, save_model_file
from energyflow.nets import MLPEnergyNet, MLPField
from energyflow.paths import VPPath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_rebuilds_the_same_network_path_and_prediction(tmp_path):
    torch.manual_seed(0)
    net = MLPField(3, hidden=16, depth=2, cond_dim=0, time_dim=8)
    file = save_model(net, str(tmp_path), "efm", {"beta": 3.0}, path=VPPath(schedule="cosine"))
    model = load_model(file)
    assert model.net.init_kwargs == net.init_kwargs and model.sample_shape == (3,)
    assert isinstance(model.path, VPPath) and model.path.schedule == "cosine" and model.prediction == "epsilon"
    assert model.meta == {"beta": 3.0}
    x, t = torch.randn(5, 3), torch.rand(5)
    assert torch.equal(model.net(x, t), net.eval()(x, t))
    energy = MLPEnergyNet(2, hidden=8, depth=1)
    again = load_model(save_model_file(tmp_path / "e.pt", energy))
    assert torch.equal(again.net(torch.ones(2, 2), torch.zeros(2)), energy(torch.ones(2, 2), torch.zeros(2)))


def test_a_model_file_cannot_name_an_unregistered_class(tmp_path):
    record = model_record(MLPField(2, hidden=8, depth=1), path="ot")
    record["class"] = "os.system"
    record["init"] = {"command": "touch pwned"}
    torch.save(record, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match="not a registered energyflow model"):
        load_model(tmp_path / "evil.pt")
    assert not os.path.exists("pwned")


def test_weights_that_do_not_fit_the_stored_arguments_name_the_file(tmp_path):
    record = model_record(MLPField(2, hidden=8, depth=1))
    record["init"]["hidden"] = 16
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(CorruptFileError, match="bad.pt: cannot rebuild energyflow.MLPField"):
        load_model(tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(CorruptFileError, match="not a self-describing"):
        load_model(tmp_path / "old.pt")


def test_sample_a_model_file_in_a_process_that_never_imports_a_domain(tmp_path):
    torch.manual_seed(0)
    file = save_model(MLPField(2, hidden=8, depth=1), str(tmp_path), "m", path="ot")
    code = ("import sys, torch; from energyflow.cli import main; "
            f"rc = main(['sample', {file!r}, '-n', '32', '--sampler', 'euler', '--steps', '4']); "
            "assert rc == 0; assert not [m for m in sys.modules if m == 'domains' or m.startswith('domains.')]; "
            f"x = torch.load({str(tmp_path / 'models' / 'm_samples.pt')!r}); assert x.shape == (32, 2)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_core_imports_no_domain():
    """No arrow from energyflow/ into domains/: the core's modules never import ``domains``."""
    offenders = []
    for file in glob.glob(os.path.join(ROOT, "energyflow", "**", "*.py"), recursive=True):
        tree = ast.parse(open(file, encoding="utf-8").read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{os.path.relpath(file, ROOT)}: {n}" for n in names if n.split(".")[0] == "domains"]
    assert not offenders, offenders


def test_every_toy_model_loads_without_the_domain(tmp_path):
    """The toy's and the iterative experiment's model files rebuild with load_model in a process
    that never imports ``domains`` and compute exactly what the experiment's own networks compute."""
    import json

    from energyflow.cli import build_experiment, compose_recipe, main

    toy = ["experiment.betas=[3]", "experiment.paths=[ot,vp]", "experiment.baselines=[fm,cep]",
           "experiment.trainer.steps=3", "experiment.path_trainer.vp.steps=3", "experiment.cep.steps=3",
           "experiment.num_eval_samples=100", "experiment.eval_repeats=1", "experiment.pool_size=20000",
           "experiment.trainer.progress=false", "device=cpu", "+experiment.plot=false"]
    iterative = ["experiment.base_steps=3", "experiment.round_steps=2", "experiment.oneshot_steps=3",
                 "experiment.num_samples=1024", "experiment.num_eval_samples=100", "experiment.eval_repeats=1",
                 "experiment.schedule=[5,10]", "+experiment.plot=false"]
    runs = {"toy": ("toy_8gaussians.yaml", toy), "iterative": ("toy_iterative.yaml", iterative)}
    files, refs = [], {}
    x, t = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.full((6,), 0.4)
    for name, (recipe, overrides) in runs.items():
        run_dir = tmp_path / name
        assert main(["run", os.path.join(ROOT, "recipes", recipe), *overrides, "--run-dir", str(run_dir)]) == 0
        experiment = build_experiment(compose_recipe(os.path.join(ROOT, "recipes", recipe), overrides))
        for f in sorted(run_dir.rglob("*.pt")):
            if f.name == "checkpoint.pt":
                continue
            files.append(str(f))
        if name == "toy":  # the domain's own networks, loaded the domain's way
            for model in ("efm_ot_beta3", "efm_vp_beta3", "fm_ot", "cep_beta3"):
                net, _ = experiment._load_field(str(run_dir), model, torch.device("cpu"))
                with torch.no_grad():
                    refs[str(run_dir / "models" / f"{model}.pt")] = net(x, t)
        else:
            for model in ("base", "iterative", "oneshot"):
                with torch.no_grad():
                    refs[next(str(f) for f in run_dir.rglob("model.pt") if f.parent.name.startswith(model))] = \
                        experiment._load(str(run_dir), model)(x, t)
    assert len(files) >= 12
    torch.save({"x": x, "t": t, "refs": refs}, tmp_path / "refs.pt")
    code = f"""
import sys, torch
from energyflow.models import load_model
data = torch.load({str(tmp_path / 'refs.pt')!r})
for f in {files!r}:
    m = load_model(f)
    if f in data["refs"]:
        with torch.no_grad():
            assert torch.equal(m.net(data["x"], data["t"]), data["refs"][f]), f
assert not [k for k in sys.modules if k == "domains" or k.startswith("domains.")]
print("ok", len({files!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
    assert json.loads((tmp_path / "toy" / "results.json").read_text())
