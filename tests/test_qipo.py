"""QIPO on tiny data: grouped weights per state, a full pipeline that beats the behaviour policy on
a contextual bandit, stage caching across β, resume, and the evaluation protocol."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
from domains.rl.datasets import Transitions  # noqa: E402
from domains.rl.qipo import QIPO, QIPOConfig, standardize_within_groups  # noqa: E402
from energyflow.weights import energy_weights  # noqa: E402


def bandit(n=4000, seed=0):
    """One-step episodes: state s ~ U[-1,1]^3, behaviour actions ~ U[-1,1]^2,
    reward −|a − a*(s)|² with a*(s) = 0.6·(s0, −s1): Q = r, the best action is a*(s)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 3, generator=g) * 2 - 1
    a = torch.rand(n, 2, generator=g) * 2 - 1
    best = 0.6 * torch.stack([s[:, 0], -s[:, 1]], 1)
    r = -(a - best).square().sum(1)
    return Transitions(observations=s, actions=a, rewards=r, next_observations=s.clone(),
                       terminals=torch.ones(n), timeouts=torch.zeros(n), episode_ids=torch.arange(n),
                       env_id=None, ref_min_score=None, ref_max_score=None), best


def tiny_config(**kw):
    base = dict(path="ot", hidden=64, depth=2, num_support=8, critic_hidden=64, critic_depth=2,
                behaviour={"steps": 400, "batch_size": 256, "lr": 2e-3, "ema_decay": 0.99},
                critic={"steps": 400, "batch_size": 256, "lr": 2e-3, "ema_decay": 0.99}, critic_states=2000,
                alpha=0.1, beta=2.0, rounds=2, round_steps=150, round_states=512,
                round_trainer={"batch_size": 512, "lr": 1e-3, "ema_decay": 0.0})
    base.update(kw)
    return QIPOConfig(**base)


def expected_reward(policy, n=2000, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 3, generator=g) * 2 - 1
    a = policy.act(s, torch.Generator().manual_seed(seed))
    best = 0.6 * torch.stack([s[:, 0], -s[:, 1]], 1)
    return float(-(a - best).square().sum(1).mean())


def test_grouped_weights_are_a_softmax_of_standardised_q_per_state():
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0], [100.0, 100.5, 99.0, 101.0]], dtype=torch.float64)
    qs = standardize_within_groups(q)
    w = energy_weights(-qs.reshape(-1), beta=1.5, group_size=4).weights.view(2, 4)
    for g in range(2):
        z = (q[g] - q[g].mean()) / q[g].std()
        hand = torch.exp(1.5 * z) / torch.exp(1.5 * z).sum()
        assert torch.allclose(w[g], hand, atol=1e-12)
    # scale-free: adding a constant or rescaling a group's Q changes nothing
    assert torch.allclose(standardize_within_groups(q * 10 + 5), qs)


@pytest.mark.slow
def test_qipo_improves_on_behaviour_and_caches_stages(tmp_path):
    torch.set_num_threads(1)
    data, _ = bandit()
    qipo = QIPO(data, tiny_config(), str(tmp_path), device="cpu", progress=False)
    rewards = {}
    records = qipo.run_rounds(evaluate=lambda pol, r: {"reward": expected_reward(pol)})
    rewards = [rec["reward"] for rec in records]
    print("expected reward per round", rewards)
    assert [rec["round"] for rec in records] == [0, 1, 2]
    # behaviour ≈ uniform actions: E|a − a*|² ≈ 2/3 + |a*|²; QIPO must move towards a*
    assert rewards[0] < -0.6
    assert rewards[1] > rewards[0] + 0.25 and rewards[2] > -0.3, rewards  # measured: -0.77, -0.22, -0.06
    critic_summary = qipo.critic_stage.summary
    assert "dataset_return_to_go_mean" in critic_summary

    # a new β: behaviour model and critic are reused, only the rounds run again
    behaviour_done = os.path.getmtime(qipo.behaviour_stage.file("done.json"))
    critic_done = os.path.getmtime(qipo.critic_stage.file("done.json"))
    qipo_b0 = QIPO(data, tiny_config(beta=0.0, rounds=1), str(tmp_path), device="cpu",
                   progress=False)
    assert qipo_b0.behaviour_stage.done and qipo_b0.critic_stage.done and not qipo_b0.rounds_stage.done
    control = qipo_b0.run_rounds(evaluate=lambda pol, r: {"reward": expected_reward(pol)})
    assert control[1]["reward"] < rewards[0] + 0.1  # β = 0 (no Q weighting) does not improve
    assert os.path.getmtime(qipo.behaviour_stage.file("done.json")) == behaviour_done
    assert os.path.getmtime(qipo.critic_stage.file("done.json")) == critic_done
    # a new critic temperature invalidates the critic (and rounds) but not the behaviour model
    qipo_a = QIPO(data, tiny_config(alpha=1.0), str(tmp_path), device="cpu", progress=False)
    assert qipo_a.behaviour_stage.done and not qipo_a.critic_stage.done

    # resume: a finished rounds stage returns its records without training
    again = QIPO(data, tiny_config(), str(tmp_path), device="cpu", progress=False)
    assert [r["round"] for r in again.run_rounds()] == [0, 1, 2]


def test_evaluation_protocol_with_a_scripted_policy():
    gym = pytest.importorskip("gymnasium")
    from domains.rl.evaluate import evaluate_policy

    zero = lambda obs: torch.zeros(obs.shape[0], 6)
    res = evaluate_policy(zero, "Walker2d-v5", episodes=3, seed=5, ref_min=0.0, ref_max=100.0)
    # the same episodes by hand
    returns = []
    for i in range(3):
        env = gym.make("Walker2d-v5")
        env.reset(seed=5 + i)
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(np.zeros(6))
            total += r
            done = term or trunc
        returns.append(total)
    assert np.allclose(res.returns, returns)
    assert np.allclose(res.normalized, np.array(returns))  # (R − 0) / (100 − 0) × 100
    assert res.as_dict()["normalized_score"] == pytest.approx(float(np.mean(returns)))


def test_changing_the_number_of_rounds_reads_a_prefix_or_continues(tmp_path):
    """Rounds are a chain: fewer rounds read the cached prefix (no training, same policy), more rounds
    continue from the last cached one and give what one long run gives."""
    torch.set_num_threads(1)
    data, _ = bandit()
    long_dir, short_dir = tmp_path / "long", tmp_path / "short"
    full = QIPO(data, tiny_config(rounds=3), str(long_dir), device="cpu", progress=False)
    records = full.run_rounds(evaluate=lambda pol, r: {"reward": expected_reward(pol)})
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    round3 = full.rounds_stage.file("round3/policy.pt")
    stamp = os.path.getmtime(round3)

    prefix = QIPO(data, tiny_config(rounds=2), str(long_dir), device="cpu", progress=False)
    assert prefix.rounds_stage.path == full.rounds_stage.path
    calls = []
    got = prefix.run_rounds(evaluate=lambda pol, r: calls.append(r) or {})
    assert [r["round"] for r in got] == [0, 1, 2] and calls == []  # read from the cache, nothing trained
    assert got[2]["reward"] == records[2]["reward"]
    assert os.path.getmtime(round3) == stamp

    # 2 rounds, then 3: the third continues the cached chain and equals the long run's
    QIPO(data, tiny_config(rounds=2), str(short_dir), device="cpu", progress=False).run_rounds()
    more = QIPO(data, tiny_config(rounds=3), str(short_dir), device="cpu", progress=False)
    more.run_rounds()
    a = torch.load(more.rounds_stage.file("round3/policy.pt"))["state_dict"]  # self-describing model files
    b = torch.load(round3)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# -- hardening: stage keys, validation, damaged files, concurrent runs ---------------------------------
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from domains.rl.qipo import transitions_fingerprint  # noqa: E402
from energyflow.errors import CorruptFileError, InputError, UnsafeFileError  # noqa: E402

STAGES = ("behaviour", "critic", "rounds", "qgpo", "onestep")


def stage_keys(data, cfg, root="unused", **kw):
    q = QIPO(data, cfg, root, device="cpu", progress=False, **kw)
    return {"behaviour": q.behaviour_stage.key, "critic": q.critic_stage.key, "rounds": q.rounds_stage.key,
            "qgpo": q.qgpo_stage.key, "onestep": q.onestep_stage(cfg.rounds).key}


# field -> (a changed value, the stages whose output it changes; the others must keep their keys)
ALL, CRITIC_ON, ROUNDS_ON = STAGES, ("critic", "rounds", "qgpo", "onestep"), ("rounds", "onestep")
KEY_CASES = {
    "path": ("vp", ALL), "hidden": (32, ALL), "depth": (3, ALL), "seed": (1, ALL),
    "behaviour": ({"steps": 401, "batch_size": 256, "lr": 2e-3, "ema_decay": 0.99}, ALL),
    "num_support": (4, CRITIC_ON), "critic_hidden": (32, CRITIC_ON), "critic_depth": (3, CRITIC_ON),
    "gamma": (0.9, CRITIC_ON), "alpha": (0.2, CRITIC_ON), "critic_states": (1000, CRITIC_ON),
    "critic": ({"steps": 400, "batch_size": 128, "lr": 2e-3, "ema_decay": 0.99}, CRITIC_ON),
    "beta": (3.0, ("rounds", "qgpo", "onestep")), "round_steps": (151, ROUNDS_ON), "round_states": (256, ROUNDS_ON),
    "round_trainer": ({"batch_size": 512, "lr": 5e-4, "ema_decay": 0.0}, ROUNDS_ON),
    "q_scale": ("frozen", ROUNDS_ON), "round_time": ("sample", ROUNDS_ON), "round_optimizer": ("kept", ROUNDS_ON),
    "qgpo": ({**QIPOConfig().qgpo, "steps": 11}, ("qgpo",)),
    "onestep": ({**QIPOConfig().onestep, "steps": 11}, ("onestep",)),
    # not in the rounds' key: rounds form a chain (a prefix or a continuation of the cached one); the
    # one-step policy is keyed by the round it distils. Resume is exact, so where a stage checkpoints
    # does not change it; the guidance scale acts at sampling time
    "rounds": (5, ("onestep",)), "checkpoint_every": (7, ()), "qgpo_scale": (2.0, ()),
}


def test_every_setting_that_changes_a_stage_changes_its_key_and_only_downstream_keys():
    data, _ = bandit(n=300)
    fields = {f.name for f in dataclasses.fields(QIPOConfig)}
    assert fields <= set(KEY_CASES), f"classify the new QIPOConfig fields {fields - set(KEY_CASES)} in KEY_CASES"
    base = stage_keys(data, tiny_config())
    for name, (value, affected) in KEY_CASES.items():
        cfg = tiny_config(qgpo={**tiny_config().qgpo, "scale": value}) if name == "qgpo_scale" else tiny_config(**{name: value})
        keys = stage_keys(data, cfg)
        for stage in STAGES:
            assert (keys[stage] != base[stage]) == (stage in affected), (name, stage)

    # the reward scale: explicitly, and through the scaled rewards' contents; the behaviour model reads no reward
    explicit = stage_keys(data, tiny_config(), reward_scale=2.0)
    scaled = stage_keys(data.scaled_rewards(2.0), tiny_config())
    for keys in (explicit, scaled):
        assert keys["behaviour"] == base["behaviour"]
        assert all(keys[s] != base[s] for s in CRITIC_ON)

    # the bytes of the dataset (same name, other contents: a replaced .hdf5, a rebuilt Minari id)
    def edited(name, fn):
        arr = getattr(data, name).clone()
        fn(arr)
        return dataclasses.replace(data, **{name: arr})

    changes = {"actions": (lambda a: a[7].add_(1e-3), ALL), "observations": (lambda a: a[0, 0].add_(1e-3), ALL),
               "rewards": (lambda a: a[3].add_(1e-3), CRITIC_ON), "terminals": (lambda a: a[5].zero_(), CRITIC_ON),
               "next_observations": (lambda a: a[1, 2].add_(1e-3), CRITIC_ON),
               "timeouts": (lambda a: a[9].fill_(1.0), CRITIC_ON), "episode_ids": (lambda a: a[2].add_(1), CRITIC_ON)}
    for name, (fn, affected) in changes.items():
        keys = stage_keys(edited(name, fn), tiny_config())
        for stage in STAGES:
            assert (keys[stage] != base[stage]) == (stage in affected), (name, stage)
    # a fingerprint computed once and passed in gives the same keys
    assert stage_keys(data, tiny_config(), fingerprints=transitions_fingerprint(data)) == base


@pytest.mark.parametrize("settings, key", [
    ({"beta": -1}, "qipo.beta"), ({"beta": math.nan}, "qipo.beta"), ({"beta": math.inf}, "qipo.beta"),
    ({"rounds": -1}, "qipo.rounds"), ({"rounds": 1.5}, "qipo.rounds"), ({"round_steps": 0}, "qipo.round_steps"),
    ({"num_support": 1}, "qipo.num_support"), ({"alpha": -0.1}, "qipo.alpha"), ({"gamma": 1.0}, "qipo.gamma"),
    ({"path": "sde"}, "qipo.path"), ({"critic_states": 0}, "qipo.critic_states"), ({"bogus": 1}, "bogus"),
    ({"behaviour": {"steps": 0}}, "qipo.behaviour"), ({"critic": {"lr": -1.0}}, "qipo.critic"),
    ({"round_trainer": {"stepz": 3}}, "stepz"), ({"round_trainer": {"steps": 3}}, "qipo.round_trainer.steps"),
    ({"qgpo": {"scale": math.nan}}, "qipo.qgpo.scale"), ({"qgpo": {"hidden": 0}}, "qipo.qgpo.hidden"),
    ({"num_support": 16, "round_trainer": {"batch_size": 100}}, "qipo.round_trainer.batch_size"),
])
def test_bad_settings_are_refused_with_the_key_named(settings, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")) as err:
        QIPOConfig.from_dict(settings)
    assert "\n" not in str(err.value)
    if "bogus" not in settings and "stepz" not in str(settings):
        with pytest.raises(InputError):  # also when built directly (the dataclass checks itself)
            QIPOConfig(**settings)


def test_beta_minus_one_message():
    with pytest.raises(InputError, match=r"^experiment\.qipo\.beta must be a finite number >= 0, got -1$"):
        QIPOConfig.from_dict({"beta": -1}, where="experiment.qipo")


def tiny_pipeline_config(**kw):
    return tiny_config(**{"behaviour": {"steps": 20, "batch_size": 64}, "critic": {"steps": 20, "batch_size": 64},
                          "critic_states": 128, "rounds": 1, "round_steps": 5, "round_states": 64,
                          "round_trainer": {"batch_size": 64}, "qgpo": {"steps": 5, "batch_size": 64, "hidden": 16,
                                                                        "depth": 1}, **kw})


@pytest.fixture(scope="module")
def trained_cache(tmp_path_factory):
    """A tiny finished QIPO pipeline (behaviour, critic with support set, 1 round, QGPO energy)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qipo_cache")
    data, _ = bandit(n=500)
    q = QIPO(data, tiny_pipeline_config(), str(root), device="cpu", progress=False)
    q.run_rounds()
    q.qgpo_predictor()
    return root


def fresh_copy(trained_cache, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(trained_cache, root)
    data, _ = bandit(n=500)
    return QIPO(data, tiny_pipeline_config(), str(root), device="cpu", progress=False)


def truncate(path):
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])


def empty(path):
    open(path, "wb").close()


@pytest.mark.parametrize("damage", [truncate, empty, lambda p: open(p, "wb").write(b"not a torch file")])
@pytest.mark.parametrize("target", ["behaviour", "critic", "round1", "energy", "support", "support-resume"])
def test_damaged_stage_files_fail_with_one_line_naming_the_file(trained_cache, tmp_path, damage, target):
    q = fresh_copy(trained_cache, tmp_path)
    files = {"behaviour": (q.behaviour_stage, "policy.pt", q.behaviour),
             "critic": (q.critic_stage, "critic.pt", q.critic),
             "round1": (q.rounds_stage, "round1/policy.pt", q.run_rounds),
             "energy": (q.qgpo_stage, "energy.pt", q.qgpo_predictor),
             "support": (q.critic_stage, "support.pt", q.qgpo_predictor)}  # QGPO trains on the critic's support
    if target == "support-resume":  # a killed critic stage resumes with its saved support set
        stage, name, call = q.critic_stage, "support.pt", q.critic
        os.remove(stage.file("done.json"))
        shutil.rmtree(q.qgpo_stage.folder)
    else:
        stage, name, call = files[target]
        if target == "support":
            shutil.rmtree(q.qgpo_stage.folder)
    path = stage.file(name)
    damage(path)
    with pytest.raises(CorruptFileError) as err:
        call()
    message = str(err.value)
    assert path in message and "\n" not in message and "delete" in message


def test_damaged_done_json_and_rounds_log_fail_with_one_line(trained_cache, tmp_path):
    q = fresh_copy(trained_cache, tmp_path)
    log = q.rounds_stage.file("rounds.jsonl")
    text = open(log).read()
    open(log, "w").write(text[: len(text) - 10])  # the last record cut mid-line
    with pytest.raises(CorruptFileError, match="rounds.jsonl line 2") as err:
        q.run_rounds()
    assert "\n" not in str(err.value)
    open(log, "w").write(text.replace('"round": 1', '"round": 4'))  # a gap in the chain
    with pytest.raises(CorruptFileError, match="record of round 1"):
        q.run_rounds()
    open(log, "w").write(text)
    done = q.critic_stage.file("done.json")
    open(done, "w").write('{"finished": ')
    with pytest.raises(CorruptFileError) as err:
        q.critic()
    assert done in str(err.value) and "\n" not in str(err.value)


def test_a_crafted_pickle_in_a_policy_file_is_refused_and_runs_nothing(trained_cache, tmp_path):
    q = fresh_copy(trained_cache, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = q.rounds_stage.file("round1/policy.pt")
    torch.save({"net.weight": Payload()}, path)
    with pytest.raises(UnsafeFileError, match="round1") as err:
        q.run_rounds()
    assert path in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_a_state_dict_of_another_network_is_refused(trained_cache, tmp_path):
    q = fresh_copy(trained_cache, tmp_path)
    critic = q.critic_stage.file("critic.pt")
    good = open(critic, "rb").read()
    # the model file of another network: the policy's record where the critic's should be
    shutil.copyfile(q.behaviour_stage.file("policy.pt"), critic)
    with pytest.raises(CorruptFileError, match="does not fit") as err:
        q.critic()
    assert critic in str(err.value) and "energyflow.MLPField" in str(err.value) and "\n" not in str(err.value)
    # a critic record of other sizes
    from domains.rl.critic import TwinQ

    torch.save(TwinQ(3, 2, hidden=16, depth=2).to_record(), critic)
    with pytest.raises(CorruptFileError, match="does not fit.*hidden=16") as err:
        q.critic()
    # a plain state dict (no record): not a model file
    torch.save({"weight": torch.zeros(3)}, critic)
    with pytest.raises(CorruptFileError, match="not a self-describing model file") as err:
        q.critic()
    assert critic in str(err.value) and "delete" in str(err.value)
    open(critic, "wb").write(good)
    # a policy record of another path (vp where the cache holds ot) or without its normalisation
    for edit, why in ((lambda r: r.update(path={"name": "vp"}), "path"),
                      (lambda r: r["meta"].pop("obs_mean"), "obs_mean")):
        bad = torch.load(q.behaviour_stage.file("policy.pt"))
        edit(bad)
        torch.save(bad, q.rounds_stage.file("round1/policy.pt"))
        with pytest.raises(CorruptFileError, match=f"does not fit.*{why}"):
            q.run_rounds()


WORKER = r'''
import hashlib, json, os, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import torch
torch.set_num_threads(1)
import energyflow.trainer as tr
from test_qipo import QIPO, bandit, expected_reward, tiny_pipeline_config

real_fit = tr.Trainer.fit
def fit(self):
    with open({log!r}, "a") as f:
        f.write(json.dumps([os.getpid(), self.out_dir]) + "\n")
    time.sleep(1.5)  # long enough that the other run arrives while this stage is held
    return real_fit(self)
tr.Trainer.fit = fit

data, _ = bandit(n=500)
q = QIPO(data, tiny_pipeline_config(rounds=2), {cache!r}, device="cpu", progress=False)
records = q.run_rounds(evaluate=lambda pol, r: {{"reward": expected_reward(pol, n=200)}})
weights = open(q.final_policy_file(records), "rb").read()
print(json.dumps({{"records": records, "sha": hashlib.sha256(weights).hexdigest()}}))
'''


def test_two_runs_sharing_a_cache_train_each_stage_once(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "worker.py"
    log = tmp_path / "fits.jsonl"
    script.write_text(WORKER.format(root=os.path.dirname(tests), tests=tests, log=str(log), cache=str(tmp_path / "cache")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1]  # the same records (with evaluations) and the same final weights
    assert [r["round"] for r in results[0]["records"]] == [0, 1, 2]
    fits = [json.loads(line) for line in log.read_text().splitlines()]
    folders = [os.path.relpath(d, tmp_path / "cache") for _, d in fits]
    assert sorted(folders) == sorted(set(folders)) and len(folders) == 4, folders  # behaviour, critic, round1, round2
    assert "waiting for another run" in "".join(err for _, err in outs)


def test_evaluation_refuses_unusable_inputs_with_one_line():
    from domains.rl.evaluate import evaluate_policy

    zero = lambda obs: torch.zeros(obs.shape[0], 6)  # noqa: E731
    with pytest.raises(InputError, match="episodes"):
        evaluate_policy(zero, "Walker2d-v5", episodes=0)
    with pytest.raises(InputError, match="reference scores"):
        evaluate_policy(zero, "Walker2d-v5", episodes=1, ref_min=1.0, ref_max=1.0)
    with pytest.raises(InputError, match="no reference scores for CartPole-v1"):
        evaluate_policy(zero, "CartPole-v1", episodes=1)


@pytest.mark.slow
def test_round_variants_improve_and_kept_optimizer_continues_exactly(tmp_path):
    """The ablation switches (one frozen Q scale, one flow time per sample, one optimiser kept across
    rounds) each still improve on the behaviour policy; the frozen scale is measured once (round 1)
    and reused; with a kept optimiser, 1 round then 1 more equals 2 rounds in one go."""
    torch.set_num_threads(1)
    data, _ = bandit()
    variants = {"frozen": dict(q_scale="frozen"), "per_sample_time": dict(round_time="sample"),
                "kept": dict(round_optimizer="kept")}
    for name, kw in variants.items():
        qipo = QIPO(data, tiny_config(**kw), str(tmp_path / "cache"), device="cpu", progress=False)
        records = qipo.run_rounds(evaluate=lambda pol, r: {"reward": expected_reward(pol)})
        rewards = [rec["reward"] for rec in records]
        assert rewards[2] > rewards[0] + 0.25, (name, rewards)
        scales = [rec["q_scale"] for rec in records[1:]]
        assert (scales[0] > 0 and scales[0] == scales[1]) if name == "frozen" else scales == [None, None]
    # kept optimiser: a 1-round run continued to 2 rounds equals the 2-round run above
    step = QIPO(data, tiny_config(round_optimizer="kept", rounds=1), str(tmp_path / "steps"), device="cpu",
                progress=False)
    step.run_rounds()
    cont = QIPO(data, tiny_config(round_optimizer="kept"), str(tmp_path / "steps"), device="cpu", progress=False)
    cont.run_rounds()
    once = QIPO(data, tiny_config(round_optimizer="kept"), str(tmp_path / "cache"), device="cpu", progress=False)
    a = torch.load(cont.rounds_stage.file("round2/policy.pt"), weights_only=True)["state_dict"]
    b = torch.load(once.rounds_stage.file("round2/policy.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(once.rounds_stage.file("round2/optimizer.pt"), weights_only=True)
    assert int(state["state"][0]["step"]) == 2 * 150  # one AdamW across both rounds


def test_round_switches_are_checked():
    for key, bad in (("q_scale", "global"), ("round_time", "per_state"), ("round_optimizer", "reset")):
        with pytest.raises(Exception, match=f"qipo.{key} must be one of"):
            QIPOConfig.from_dict({key: bad})


@pytest.mark.slow
def test_one_step_policy_matches_its_teacher_in_one_evaluation(tmp_path):
    """algo=qipo_onestep: the final QIPO-OT policy distilled into one Euler step acts as well as the
    10-step teacher on the bandit, and is cached (a second call trains nothing)."""
    torch.set_num_threads(1)
    data, _ = bandit()
    qipo = QIPO(data, tiny_config(onestep={"steps": 600, "batch_size": 512, "lr": 1e-3, "ema_decay": 0.99}),
                str(tmp_path), device="cpu", progress=False)
    records = qipo.run_rounds()
    teacher = qipo.new_policy()
    teacher.load_record(torch.load(qipo.final_policy_file(records), weights_only=True))
    student = qipo.onestep(records)
    assert student.sampler_cfg == {"name": "euler", "steps": 1}
    r_teacher, r_student = expected_reward(teacher.eval()), expected_reward(student)
    assert abs(r_student - r_teacher) < 0.02, (r_teacher, r_student)
    # the student has the teacher's law, not only its mean: the same spread of actions per state.  (The
    # teacher's own single Euler step, where the student starts, gives the policy's mean action instead.)
    one_euler = qipo.new_policy(sampler={"name": "euler", "steps": 1})
    one_euler.load_state_dict(teacher.state_dict())
    s = torch.rand(64, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    spread = {name: float(p.eval().sample(s, 256, torch.Generator().manual_seed(4)).std(1).mean())
              for name, p in (("teacher", teacher), ("student", student), ("euler1", one_euler))}
    print("expected reward: teacher", r_teacher, "student", r_student, "| action spread per state", spread)
    assert abs(spread["student"] / spread["teacher"] - 1) < 0.2 and spread["euler1"] < 0.6 * spread["teacher"], spread  # measured 0.172, 0.172, 0.091
    done = os.path.getmtime(qipo.onestep_stage(2).file("done.json"))
    qipo.onestep(records)
    assert os.path.getmtime(qipo.onestep_stage(2).file("done.json")) == done
