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
    a = torch.load(more.rounds_stage.file("round3/policy.pt"))
    b = torch.load(round3)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
