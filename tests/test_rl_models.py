"""Every network the RL domain saves is a self-describing model file: after a tiny QIPO-OT and QGPO
run, each one (behaviour policies, a round's policy, the critics, QGPO's energy network and the
run directory's copies) is rebuilt by :func:`energyflow.models.load_model` in a process that never
imports ``domains``, and the rebuilt core network computes exactly what the domain module computes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("minari")
from test_rl_experiment import ACTORS, TINY_QIPO  # noqa: E402  (the tiny settings of the experiment tests)

from domains.rl.critic import TwinQ  # noqa: E402
from domains.rl.experiment import OfflineRLExperiment  # noqa: E402
from domains.rl.policy import load_weights  # noqa: E402
from domains.rl.qipo import make_energy_net, make_policy  # noqa: E402
from energyflow.cli import main  # noqa: E402

SEED = 0

# Runs in a fresh interpreter, cwd a temporary folder: rebuilds each file with the core only and
# compares its outputs with the domain module's (computed in the test process, passed in a file).
CHECK = r"""
import sys, torch
torch.set_num_threads(1)
from energyflow.models import load_model
from energyflow.samplers import build_sampler

cases = torch.load(sys.argv[1], weights_only=True)
with torch.no_grad():
    for case in cases:
        model, inp, want = load_model(case["file"]), case["inputs"], case["expected"]
        meta = model.meta
        norm = (inp["obs"] - meta["obs_mean"]) / meta["obs_std"]  # the conditioning the record describes
        if case["kind"] == "policy":
            assert meta["role"] == "policy" and model.sample_shape == (inp["x"].shape[1],), (meta["role"], model.sample_shape)
            got = {"field": model.net(inp["x"], inp["t"], norm)}
            cfg = dict(meta["sampler"])
            sampler = build_sampler(cfg.pop("name"), **cfg)
            x0 = torch.randn(norm.shape[0], *model.sample_shape, generator=torch.Generator().manual_seed(inp["seed"]))
            got["sample"] = sampler.sample(model.predictor(x1_clip=meta["x1_clip"]), x0, norm).x
            got["act"] = got["sample"].clamp(meta["action_low"], meta["action_high"])
        elif case["kind"] == "critic":
            assert meta["role"] == "twin critic", meta["role"]
            q = model.net(torch.cat([norm, inp["act"]], dim=-1))
            got = {"q": q, "min_q": q.min(dim=1).values}
        else:
            assert meta["role"] == "QGPO intermediate energy", meta["role"]
            got = {"energy": model.net(inp["x"], inp["t"], norm)}
        for key, value in want.items():
            # networks: bit-identical; sampling: the domain binds the state once per sample set
            # (MLPField.bind), an equal sum in another order, so equal to float rounding
            same = torch.equal(got[key], value) if key not in ("sample", "act") else torch.allclose(
                got[key], value, rtol=1e-5, atol=1e-5)
            assert got[key].shape == value.shape and same, (case["file"], key)
        print("same outputs:", case["name"], type(model.net).__name__, sorted(want))
leaked = sorted(m for m in sys.modules if m == "domains" or m.startswith("domains."))
assert not leaked, leaked
"""


def experiment(algo, cache):
    return OfflineRLExperiment(env_id="Walker2d-v5", dataset="default", algo=algo, qipo=TINY_QIPO, seeds=[SEED],
                               eval_episodes=1, cache_dir=str(cache), progress=False, device="cpu",
                               default_dataset={"id": "energyflow/test-walker-v0", "actors": ACTORS,
                                                "steps_per_actor": [100, 100, 100]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny QIPO-OT run and a tiny QGPO run sharing a stage cache; returns every RL network file
    with the experiment that wrote it, and the dataset."""
    root = tmp_path_factory.mktemp("rl_models")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    try:
        files = {}
        for algo in ("qipo_ot", "qgpo"):
            exp = experiment(algo, root / "cache")
            run_dir = root / algo
            run_dir.mkdir()
            exp.run(str(run_dir))
            data, _ = exp.load_data()
            q = exp._qipo(data, SEED, str(root / "cache"))
            path = exp._config(SEED).path
            files[f"behaviour policy ({path})"] = (exp, "policy", q.behaviour_stage.file("policy.pt"))
            files[f"critic ({path} behaviour)"] = (exp, "critic", q.critic_stage.file("critic.pt"))
            files[f"{algo} run-dir policy"] = (exp, "policy", str(run_dir / f"seed{SEED}" / "policy.pt"))
            if algo == "qipo_ot":
                files["round 2 policy"] = (exp, "policy", q.rounds_stage.file("round2/policy.pt"))
            else:
                files["QGPO energy"] = (exp, "energy", q.qgpo_stage.file("energy.pt"))
                files["qgpo run-dir energy"] = (exp, "energy", str(run_dir / f"seed{SEED}" / "qgpo_energy.pt"))
        yield files, data, root
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def domain_outputs(exp, kind, file, data):
    """The domain module built and loaded as the domain does it, and its outputs on fixed inputs."""
    cfg = exp._config(SEED)
    g = torch.Generator().manual_seed(11)
    n = 16
    obs, act = data.observations[:n], data.actions[:n]
    x, t = torch.randn(n, data.act_dim, generator=g), torch.rand(n, generator=g)
    mean, std = data.observation_stats()
    norm = (obs - mean) / std  # the dataset's normalisation, as QIPO applies it
    inputs = {"obs": obs, "act": act, "x": x, "t": t, "seed": 5}
    with torch.no_grad():
        if kind == "policy":
            module = load_weights(make_policy(cfg, data.obs_dim, data.act_dim), file, "policy").eval()
            assert torch.equal(module.obs_mean, mean) and torch.equal(module.obs_std, std)
            sample = module.sample(obs, 1, torch.Generator().manual_seed(5))[:, 0]
            act_out = module.act(obs, torch.Generator().manual_seed(5))
            return inputs, {"field": module(x, t, norm), "sample": sample, "act": act_out}
        if kind == "critic":
            module = load_weights(TwinQ(data.obs_dim, data.act_dim, cfg.critic_hidden, cfg.critic_depth), file,
                                  "critic").eval()
            q1, q2 = module(norm, act)
            return inputs, {"q": torch.stack([q1, q2], dim=1), "min_q": module.min_q(norm, act)}
        module = load_weights(make_energy_net(cfg, data.obs_dim, data.act_dim), file, "energy").eval()
        return inputs, {"energy": module(x, t, norm)}


def test_every_rl_network_file_loads_without_the_domain_and_computes_the_same(runs, tmp_path):
    files, data, _ = runs
    mean, std = data.observation_stats()
    cases = []
    for name, (exp, kind, file) in files.items():
        assert os.path.isfile(file), name
        record = torch.load(file, weights_only=True)
        assert record["format"] == "energyflow-model/1", name
        assert torch.equal(record["meta"]["obs_mean"], mean) and torch.equal(record["meta"]["obs_std"], std), name
        inputs, expected = domain_outputs(exp, kind, file, data)
        cases.append({"name": name, "kind": kind, "file": file, "inputs": inputs, "expected": expected})
    assert {c["kind"] for c in cases} == {"policy", "critic", "energy"} and len(cases) == 9
    refs = tmp_path / "refs.pt"
    torch.save(cases, refs)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(refs)], cwd=str(work), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("same outputs:") == len(cases), proc.stdout


def test_the_records_describe_their_networks(runs):
    files, data, _ = runs
    policy = torch.load(files["round 2 policy"][2], weights_only=True)
    assert policy["class"] == "energyflow.MLPField" and policy["init"]["cond_dim"] == data.obs_dim
    assert policy["path"]["name"] == "ot" and policy["sample_shape"] == [data.act_dim]
    assert policy["meta"]["qipo_round"] == 2 and policy["meta"]["sampler"] == {"name": "euler", "steps": 10}
    vp = torch.load(files["qgpo run-dir policy"][2], weights_only=True)
    assert vp["path"]["name"] == "vp" and vp["prediction"] == "epsilon" and vp["meta"]["qipo_round"] == 0
    critic = torch.load(files["critic (ot behaviour)"][2], weights_only=True)
    assert critic["class"] == "energyflow.MLPEnsemble" and critic["init"]["members"] == 2
    assert critic["init"]["in_dim"] == data.obs_dim + data.act_dim
    assert (critic["meta"]["obs_dim"], critic["meta"]["act_dim"]) == (data.obs_dim, data.act_dim)
    energy = torch.load(files["QGPO energy"][2], weights_only=True)
    assert energy["class"] == "energyflow.MLPEnergyNet" and energy["path"] is None
    assert energy["meta"]["behaviour_path"]["name"] == "vp"
    # the run directory's copies are byte-for-byte the cached stage files they were copied from
    seed_dir = os.path.dirname(files["qgpo run-dir energy"][2])
    summary = json.loads(open(os.path.join(seed_dir, "summary.json")).read())
    assert summary["qgpo_energy"] == f"seed{SEED}/qgpo_energy.pt"
    assert open(files["QGPO energy"][2], "rb").read() == open(files["qgpo run-dir energy"][2], "rb").read()


def test_sampling_a_conditional_policy_file_from_the_cli_is_refused_in_one_line(runs, tmp_path, capsys):
    files, _, _ = runs
    policy = files["qipo_ot run-dir policy"][2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "energyflow", "sample", policy, "-n", "4"], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(err.splitlines()) == 1 and "conditional model" in err and policy in err, err
    assert not os.path.exists(os.path.splitext(policy)[0] + "_samples.pt")
    # the critic and the energy network are not sampling models either: one line, exit code 2
    for name, why in (("critic (ot behaviour)", "no sample shape"), ("QGPO energy", "stores no")):
        assert main(["sample", files[name][2], "-n", "4"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and files[name][2] in err, err
