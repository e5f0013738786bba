"""Offline RL datasets: Minari round trips in a temporary store, D4RL HDF5 files, returns-to-go,
normalisation and normalised scores.  Needs the rl extra (skipped otherwise)."""
import os
import time

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
minari = pytest.importorskip("minari")
h5py = pytest.importorskip("h5py")
pytest.importorskip("mujoco")

from domains.rl import datasets as D  # noqa: E402
from domains.rl.behaviour import SquashedGaussianActor  # noqa: E402

ENV = "Hopper-v5"
ENV_KWARGS = {"max_episode_steps": 40}  # random Hopper falls within ~15-35 steps: both flags occur
DATASET = "test/hopper/random-v0"
NUM_STEPS = 200


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary Minari store (minari reads MINARI_DATASETS_PATH on every call, no caching)
    holding one random-policy Hopper dataset; yields the episode buffers it was built from."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.mktemp("minari")))
        episodes = D.rollout(None, ENV, NUM_STEPS, seed=0, env_kwargs=ENV_KWARGS)
        dataset = D.create_minari_dataset(DATASET, episodes, ENV, env_kwargs=ENV_KWARGS, description="test data")
        yield episodes, dataset


def test_rollout_structure(store):
    episodes, _ = store
    lengths = [len(e) for e in episodes]
    assert sum(lengths) == NUM_STEPS
    assert [e.seed for e in episodes] == list(range(len(episodes)))
    for e in episodes:
        T = len(e)
        assert e.observations.shape == (T + 1, 11) and e.actions.shape == (T, 3)
        assert not (e.terminations[:-1].any() or e.truncations[:-1].any())  # flags only at the end
        assert e.terminations[-1] != e.truncations[-1]
    assert any(e.terminations[-1] for e in episodes)
    assert any(e.truncations[-1] and len(e) == 40 for e in episodes)  # time limit
    assert episodes[-1].truncations[-1] and len(episodes[-1]) < 40  # step budget ran out


def test_rollout_reproducible_and_actor_kinds():
    actor = SquashedGaussianActor(11, 3, hidden=(8,), low=[-1] * 3, high=[1] * 3)
    a = D.rollout(actor, ENV, 25, seed=3, env_kwargs=ENV_KWARGS)
    b = D.rollout(actor, ENV, 25, seed=3, env_kwargs=ENV_KWARGS)
    c = D.rollout(actor, ENV, 25, seed=3, deterministic=True, env_kwargs=ENV_KWARGS)
    assert np.array_equal(a[0].actions, b[0].actions)
    assert not np.array_equal(a[0].actions, c[0].actions)
    with torch.no_grad():
        first = actor(torch.as_tensor(c[0].observations[:1], dtype=torch.float32), deterministic=True)
    np.testing.assert_allclose(c[0].actions[0], first[0].numpy(), atol=1e-6)
    scripted = D.rollout(lambda obs: np.full(3, 5.0), ENV, 5, seed=0)  # clipped to the box
    assert np.all(scripted[0].actions == 1.0)


def test_minari_flatten(store):
    episodes, _ = store
    tr = D.load_minari(DATASET)
    assert len(tr) == NUM_STEPS and tr.obs_dim == 11 and tr.act_dim == 3
    assert tr.env_id == ENV
    assert (tr.ref_min_score, tr.ref_max_score) == pytest.approx(D.REF_SCORES["Hopper"])
    assert tr.observations.dtype == torch.float32 and tr.episode_ids.dtype == torch.int64
    obs = np.concatenate([e.observations[:-1] for e in episodes])
    next_obs = np.concatenate([e.observations[1:] for e in episodes])
    np.testing.assert_allclose(tr.observations.numpy(), obs.astype(np.float32))
    np.testing.assert_allclose(tr.next_observations.numpy(), next_obs.astype(np.float32))
    np.testing.assert_allclose(tr.actions.numpy(), np.concatenate([e.actions for e in episodes]))
    np.testing.assert_allclose(tr.rewards.numpy(), np.concatenate([e.rewards for e in episodes]).astype(np.float32))
    same = (tr.episode_ids[1:] == tr.episode_ids[:-1]).numpy()
    assert same.sum() == NUM_STEPS - len(episodes)
    assert torch.equal(tr.next_observations[:-1][same], tr.observations[1:][same])
    assert tr.num_episodes == len(episodes)


def test_terminal_and_timeout_flags(store):
    episodes, _ = store
    tr = D.load_minari(DATASET)
    ends = torch.ones(len(tr), dtype=torch.bool)
    ends[:-1] = tr.episode_ids[1:] != tr.episode_ids[:-1]
    assert torch.all(tr.terminals[~ends] == 0) and torch.all(tr.timeouts[~ends] == 0)
    for e, term, tout in zip(episodes, tr.terminals[ends], tr.timeouts[ends]):
        assert (term.item(), tout.item()) == (float(e.terminations[-1]), float(e.truncations[-1]))
        if len(e) < 40 and e is not episodes[-1]:
            assert term == 1 and tout == 0  # fell over: true termination
    assert tr.timeouts[-1] == 1 and tr.terminals[-1] == 0


def _rtg_by_hand(rewards, ids, gamma):
    out, g = np.zeros(len(rewards)), 0.0
    for i in reversed(range(len(rewards))):
        if i == len(rewards) - 1 or ids[i + 1] != ids[i]:
            g = 0.0
        g = rewards[i] + gamma * g
        out[i] = g
    return out


def _synthetic(rewards, ids, obs=None):
    n = len(rewards)
    obs = np.arange(2 * n, dtype=np.float32).reshape(n, 2) if obs is None else obs
    return D.Transitions.from_numpy(obs, np.zeros((n, 1)), rewards, obs, np.zeros(n), np.zeros(n), ids)


def test_returns_to_go(store):
    tr = D.load_minari(DATASET)
    for gamma in (0.0, 0.9, 0.99, 1.0):
        np.testing.assert_allclose(tr.returns_to_go(gamma).numpy(),
                                   _rtg_by_hand(tr.rewards.double().numpy(), tr.episode_ids.numpy(), gamma),
                                   rtol=1e-5, atol=1e-5)
    # long episodes span several blocks of the backwards pass
    rng = np.random.default_rng(0)
    ids = np.repeat([0, 1, 2], [700, 3, 260])
    rewards = rng.normal(size=len(ids))
    syn = _synthetic(rewards, ids)
    np.testing.assert_allclose(syn.returns_to_go(0.99).numpy(), _rtg_by_hand(rewards, ids, 0.99), rtol=1e-5, atol=1e-4)
    small = _synthetic(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(small.returns_to_go(0.5).numpy(), [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 4])
    with pytest.raises(ValueError):
        small.returns_to_go(1.5)
    np.testing.assert_allclose(small.episode_returns().numpy(), [6.0, 4.0])


def test_reward_scaling_and_normalisation(store):
    tr = D.load_minari(DATASET)
    scaled = tr.scaled_rewards(0.5, shift=-1.0)
    torch.testing.assert_close(scaled.rewards, tr.rewards * 0.5 - 1.0)
    assert torch.equal(tr.rewards, D.load_minari(DATASET).rewards)  # the original is untouched
    mean, std = tr.observation_stats()
    assert mean.shape == std.shape == (11,)
    torch.testing.assert_close(mean, tr.observations.mean(0), atol=1e-5, rtol=1e-5)
    normed = tr.normalized(mean, std)
    torch.testing.assert_close(normed.observations.mean(0), torch.zeros(11), atol=1e-4, rtol=0)
    torch.testing.assert_close(normed.observations.std(0, correction=0), torch.ones(11), atol=1e-3, rtol=0)
    torch.testing.assert_close(normed.next_observations, (tr.next_observations - mean) / std)
    const = _synthetic(np.zeros(4), np.zeros(4), obs=np.ones((4, 2), dtype=np.float32))
    assert torch.all(const.observation_stats()[1] == 1e-3)  # floored
    moved = tr.to("cpu")
    assert len(moved) == len(tr) and moved.env_id == tr.env_id


def test_check_spaces(store):
    tr = D.load_minari(DATASET)
    hopper, walker = gym.make(ENV), gym.make("Walker2d-v5")
    tr.check_spaces(hopper.observation_space, hopper.action_space)
    with pytest.raises(ValueError, match=r"\(11,\).*\(17,\)"):
        tr.check_spaces(walker.observation_space, walker.action_space)


def test_missing_dataset_fails_fast(store, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        D.load_minari("mujoco/walker2d/medium-v0")
    assert time.perf_counter() - start < 1.0
    assert "energyflow data" in str(info.value) and "download=True" in str(info.value)
    with pytest.raises(FileNotFoundError):
        D.load_dataset("mujoco/walker2d/medium-v0")


def test_download_errors_are_wrapped(store, monkeypatch):
    def offline(dataset_id, force_download=False):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(minari, "download_dataset", offline)
    with pytest.raises(RuntimeError, match="no route to host"):
        D.load_minari("mujoco/walker2d/medium-v0", download=True)


def _write_d4rl(path, with_next):
    # episodes: 0-2 terminal at row 2; 3-5 time-out at row 5; 6-7 unfinished (file ends)
    n = 8
    obs = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["actions"] = np.arange(n, dtype=np.float32).reshape(n, 1)
        f["rewards"] = np.arange(n, dtype=np.float32)
        f["terminals"] = np.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
        f["timeouts"] = np.array([0, 0, 0, 0, 0, 1, 0, 0], dtype=bool)
        if with_next:
            f["next_observations"] = obs + 100.0
    return obs


def test_d4rl_hdf5(tmp_path):
    path = str(tmp_path / "walker2d_medium-v2.hdf5")
    obs = _write_d4rl(path, with_next=True)
    tr = D.load_dataset(path)
    assert len(tr) == 8 and tr.obs_dim == 2 and tr.act_dim == 1
    np.testing.assert_array_equal(tr.next_observations.numpy(), obs + 100.0)
    np.testing.assert_array_equal(tr.episode_ids.numpy(), [0, 0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(tr.terminals.numpy(), [0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tr.timeouts.numpy(), [0, 0, 0, 0, 0, 1, 0, 0])
    assert (tr.ref_min_score, tr.ref_max_score) == pytest.approx(D.REF_SCORES["Walker2d"])  # from the file name

    path2 = str(tmp_path / "plain.h5")
    _write_d4rl(path2, with_next=False)
    tr2 = D.load_d4rl_hdf5(path2)
    # the time-out row 5 and the unfinished last row 7 are dropped; the terminal row 2 stays
    np.testing.assert_array_equal(tr2.rewards.numpy(), [0, 1, 2, 3, 4, 6])
    np.testing.assert_array_equal(tr2.episode_ids.numpy(), [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(tr2.terminals.numpy(), [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(tr2.next_observations.numpy()[[0, 1, 3, 4, 5]], obs[[1, 2, 4, 5, 7]])
    assert tr2.ref_min_score is None and tr2.env_id is None

    with pytest.raises(FileNotFoundError):
        D.load_d4rl_hdf5(str(tmp_path / "absent.hdf5"))
    bad = str(tmp_path / "bad.hdf5")
    with h5py.File(bad, "w") as f:
        f["observations"] = np.zeros((3, 2))
        f["actions"] = np.zeros((3, 1))
    with pytest.raises(ValueError, match="rewards.*terminals.*timeouts"):
        D.load_d4rl_hdf5(bad)


def test_normalized_score(store):
    _, dataset = store
    lo, hi = D.ref_scores_for("Walker2d-v5")
    assert (lo, hi) == (1.629008, 4592.3)
    np.testing.assert_allclose(D.normalized_score([hi, lo, (lo + hi) / 2], env_id="Walker2d-v5"), [100.0, 0.0, 50.0])
    np.testing.assert_allclose(D.normalized_score(5.0, ref_min=0.0, ref_max=10.0), 50.0)
    with pytest.raises(KeyError):
        D.ref_scores_for("Ant-v5")
    with pytest.raises(ValueError):
        D.normalized_score([1.0])
    # a scripted policy's returns, normalised by us and by Minari (which omits the factor 100)
    scripted = D.rollout(lambda obs: np.zeros(3), ENV, 80, seed=0, env_kwargs=ENV_KWARGS)
    returns = np.array([float(np.sum(e.rewards)) for e in scripted])
    ours = D.normalized_score(returns, env_id=ENV)
    np.testing.assert_allclose(ours, 100.0 * minari.get_normalized_score(dataset, returns))
    tr = D.load_minari(DATASET)
    np.testing.assert_allclose(D.normalized_score(tr.episode_returns().numpy(), ref_min=tr.ref_min_score,
                                                  ref_max=tr.ref_max_score),
                               100.0 * minari.get_normalized_score(dataset, tr.episode_returns().double().numpy()),
                               rtol=1e-5)


def test_overwrite_refused(store):
    episodes, _ = store
    with pytest.raises(FileExistsError, match="overwrite=True"):
        D.create_minari_dataset(DATASET, episodes[:1], ENV, env_kwargs=ENV_KWARGS)
    assert len(D.load_minari(DATASET)) == NUM_STEPS  # untouched
    with pytest.raises(ValueError, match="-vN"):
        D.create_minari_dataset("test/no-version", episodes[:1], ENV)
    other = "test/hopper/overwrite-v0"
    D.create_minari_dataset(other, episodes[:2], ENV, env_kwargs=ENV_KWARGS)
    ds = D.create_minari_dataset(other, episodes[:1], ENV, env_kwargs=ENV_KWARGS, overwrite=True,
                                 ref_min_score=0.0, ref_max_score=1.0)
    assert ds.total_episodes == 1
    tr = D.load_minari(other)
    assert len(tr) == len(episodes[0]) and (tr.ref_min_score, tr.ref_max_score) == (0.0, 1.0)


def test_make_mixed_dataset(store, tmp_path):
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        actor = SquashedGaussianActor(11, 3, hidden=(8,), low=[-1] * 3, high=[1] * 3)
        meta = {"env_id": ENV, "obs_dim": 11, "act_dim": 3, "hidden": [8], "low": [-1] * 3, "high": [1] * 3,
                "steps": 1000 * (i + 1), "eval_return": float(i)}
        paths.append(str(tmp_path / f"actor_{i}.pt"))
        torch.save({"actor": actor.state_dict(), "meta": meta}, paths[-1])
    ds = D.make_mixed_dataset("test/hopper/mixed-v0", paths, [30, 20], seed=5, env_kwargs=ENV_KWARGS)
    assert ds.total_steps == 50
    assert "actor_0.pt" in ds.storage.metadata["description"]
    tr = D.load_minari("test/hopper/mixed-v0")
    assert len(tr) == 50 and tr.env_id == ENV
    with pytest.raises(FileExistsError):
        D.make_mixed_dataset("test/hopper/mixed-v0", paths, 10)
    with pytest.raises(ValueError, match="does not fit"):
        D.make_mixed_dataset("test/walker/mixed-v0", paths, 10, env_id="Walker2d-v5")
    assert not os.path.exists(os.path.join(os.environ["MINARI_DATASETS_PATH"], "test/walker/mixed-v0"))


def test_make_mixed_dataset_with_random_actions(store, tmp_path):
    """'random' in the actor list rolls out uniformly random actions (a replay buffer's exploratory
    start, or on its own a D4RL-like random dataset), reproducibly and inside the action box."""
    ds = D.make_mixed_dataset("test/hopper/random-mix-v0", [D.RANDOM_ACTOR], 30, env_id=ENV, seed=3,
                              env_kwargs=ENV_KWARGS)
    assert ds.total_steps == 30 and "random" in ds.storage.metadata["description"]
    tr = D.load_minari("test/hopper/random-mix-v0")
    expected = D.rollout(None, ENV, 30, seed=3, env_kwargs=ENV_KWARGS)
    assert np.allclose(tr.actions.numpy(), np.concatenate([e.actions for e in expected]), atol=1e-6)
    assert float(tr.actions.abs().max()) <= 1.0 and float(tr.actions.std()) > 0.4  # uniform on [-1, 1]: std 0.58
    with pytest.raises(ValueError, match="name the environment"):
        D.make_mixed_dataset("test/hopper/random-mix-v1", [D.RANDOM_ACTOR], 10)
