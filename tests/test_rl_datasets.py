"""Offline RL datasets: Minari round trips in a temporary store, D4RL HDF5 files, returns-to-go,
normalisation and normalised scores; all-or-nothing dataset writes; one-line errors for bad data,
bad environment ids and bad actor files; the shipped behaviour checkpoints and the ``energyflow
data`` plugin.  Needs the rl extra (skipped otherwise)."""
import errno
import glob
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
from domains.rl.behaviour import (CHECKPOINT_DIR, SquashedGaussianActor, load_actor,  # noqa: E402
                                  resolve_actor_path, shipped_checkpoints)
from energyflow.cli import main  # noqa: E402
from energyflow.errors import CorruptFileError, InputError, UnsafeFileError  # noqa: E402

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


# ---------------------------------------------------------------------------------------------
# All-or-nothing writes


def _snapshot(dataset_id):
    tr = D.load_minari(dataset_id)
    return {k: getattr(tr, k).clone() for k in ("observations", "actions", "rewards", "next_observations",
                                                "terminals", "timeouts", "episode_ids")}


def _staging_left():
    return glob.glob(os.path.join(os.environ["MINARI_DATASETS_PATH"], ".energyflow-staging-*"))


def _failing_writer(monkeypatch, exc):
    """Make Minari's write fail after it has put a partial dataset on disk (in the staging folder)."""
    real = minari.create_dataset_from_buffers
    seen = {}

    def write_then_fail(dataset_id, buffer, **kwargs):
        real(dataset_id, buffer[:1], **kwargs)  # files on disk, as a half-finished write would leave
        seen["path"] = str(D._local_dataset_dir(dataset_id))
        raise exc

    monkeypatch.setattr(minari, "create_dataset_from_buffers", write_then_fail)
    return seen


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_overwrite_is_all_or_nothing(store, monkeypatch, exc):
    """A failure while the replacement is written leaves the old dataset, loading with identical
    contents, and no staging folder; the staging folder is where the partial write went."""
    episodes, _ = store
    dataset_id = f"test/hopper/swap-{type(exc).__name__.lower()}-v0"
    D.create_minari_dataset(dataset_id, episodes[:3], ENV, env_kwargs=ENV_KWARGS)
    before = _snapshot(dataset_id)
    with monkeypatch.context() as mp:
        seen = _failing_writer(mp, exc)
        with pytest.raises(type(exc)):
            D.create_minari_dataset(dataset_id, episodes[3:], ENV, env_kwargs=ENV_KWARGS, overwrite=True)
    assert ".energyflow-staging-" in seen["path"]  # the partial write did not touch the store's copy
    after = _snapshot(dataset_id)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not _staging_left()
    assert dataset_id in minari.list_local_datasets()
    # a failed first write leaves nothing at all
    with monkeypatch.context() as mp:
        _failing_writer(mp, exc)
        with pytest.raises(type(exc)):
            D.create_minari_dataset("test/hopper/never-v0", episodes[:2], ENV, env_kwargs=ENV_KWARGS)
    assert not D._local_dataset_dir("test/hopper/never-v0").exists() and not _staging_left()
    # and a successful overwrite replaces the contents
    D.create_minari_dataset(dataset_id, episodes[3:5], ENV, env_kwargs=ENV_KWARGS, overwrite=True)
    assert len(D.load_minari(dataset_id)) == len(episodes[3]) + len(episodes[4])
    assert not _staging_left()


def test_cli_make_overwrite_failure_keeps_the_old_dataset(store, monkeypatch, capsys):
    """`energyflow data make ID --overwrite` on a full disk: one error line, exit code 2, old data intact;
    the shipped checkpoints are named by file name."""
    dataset_id = "test/walker/cli-swap-v0"
    assert main(["data", "make", dataset_id, "--actors", "walker2d_sac_020k.pt", "--steps-per-actor", "30"]) == 0
    assert "30 steps" in capsys.readouterr().out
    before = _snapshot(dataset_id)
    with monkeypatch.context() as mp:
        _failing_writer(mp, OSError(errno.ENOSPC, "No space left on device"))
        code = main(["data", "make", dataset_id, "--actors", "random", "--env", "Walker2d-v5",
                     "--steps-per-actor", "20", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    after = _snapshot(dataset_id)
    assert all(torch.equal(before[k], after[k]) for k in before) and not _staging_left()


def test_stale_staging_of_a_killed_build_is_removed(store):
    """A build killed with SIGKILL cannot clean up: the next build removes its staging folder (dead pid)."""
    episodes, _ = store
    root = os.environ["MINARI_DATASETS_PATH"]
    import socket
    dead = os.path.join(root, f".energyflow-staging-{socket.gethostname()}-999999999-abc")
    os.makedirs(os.path.join(dead, "store", "x"))
    D.create_minari_dataset("test/hopper/after-kill-v0", episodes[:1], ENV, env_kwargs=ENV_KWARGS)
    assert not os.path.exists(dead) and not _staging_left()


# ---------------------------------------------------------------------------------------------
# One-line errors for bad input


def test_garbage_hdf5_is_named(tmp_path):
    path = tmp_path / "walker2d_medium-v2.hdf5"
    path.write_bytes(b"this is not an HDF5 file\n" * 10)
    with pytest.raises(D.InvalidDatasetError, match="not a readable HDF5 file") as info:
        D.load_dataset(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(D.DatasetNotFoundError, match="not found"):
        D.load_dataset(str(tmp_path / "absent.hdf5"))


def _write_arrays(path, **overrides):
    n = 6
    arrays = {"observations": np.ones((n, 3), np.float32), "actions": np.zeros((n, 2), np.float32),
              "rewards": np.ones(n, np.float32), "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool),
              "next_observations": np.ones((n, 3), np.float32)}
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f[key] = value
    return path


def test_hdf5_arrays_of_different_lengths(tmp_path):
    path = _write_arrays(str(tmp_path / "short.hdf5"), actions=np.zeros((5, 2), np.float32))
    with pytest.raises(InputError, match=r"observations has 6 rows but actions has 5") as info:
        D.load_d4rl_hdf5(path)
    assert path in str(info.value)  # not numpy's "cannot reshape array"
    path = _write_arrays(str(tmp_path / "next.hdf5"), next_observations=np.zeros((6, 4), np.float32))
    with pytest.raises(InputError, match="next_observations"):
        D.load_d4rl_hdf5(path)


@pytest.mark.parametrize("key", ["observations", "actions", "rewards", "next_observations"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_hdf5_non_finite_values(tmp_path, key, bad):
    shape = {"observations": (6, 3), "actions": (6, 2), "rewards": (6,), "next_observations": (6, 3)}[key]
    values = np.ones(shape, np.float32)
    values[4] = bad
    path = _write_arrays(str(tmp_path / "nan.hdf5"), **{key: values})
    with pytest.raises(D.InvalidDatasetError, match=rf"key '{key}' holds .* NaN/inf values \(first in row 4\)") as info:
        D.load_d4rl_hdf5(path)
    assert path in str(info.value)


def test_hdf5_missing_key(tmp_path):
    path = _write_arrays(str(tmp_path / "nokey.hdf5"), timeouts=None)
    with pytest.raises(InputError, match=r"missing the D4RL keys \['timeouts'\]") as info:
        D.load_d4rl_hdf5(path)
    assert path in str(info.value)


def test_minari_non_finite_and_corrupt(store):
    episodes, _ = store
    bad = [e for e in episodes[:2]]
    bad[1] = type(bad[1])(**{**bad[1].__dict__, "rewards": np.where(np.arange(len(bad[1])) == 2, np.nan,
                                                                    bad[1].rewards)})
    D.create_minari_dataset("test/hopper/nan-v0", bad, ENV, env_kwargs=ENV_KWARGS)
    with pytest.raises(D.InvalidDatasetError, match=r"test/hopper/nan-v0.*episode 1: key 'rewards'"):
        D.load_minari("test/hopper/nan-v0")
    D.create_minari_dataset("test/hopper/corrupt-v0", episodes[:1], ENV, env_kwargs=ENV_KWARGS)
    meta = D._local_dataset_dir("test/hopper/corrupt-v0") / "data" / "metadata.json"
    meta.write_text("{ not json")
    with pytest.raises(D.InvalidDatasetError, match=r"test/hopper/corrupt-v0.*cannot be read"):
        D.load_minari("test/hopper/corrupt-v0")


def test_unknown_environment_id(store):
    for bad in ("Walkr2d-v5", "Walker2d-v99", "nowhere/Walker2d-v5"):
        with pytest.raises(D.UnknownEnvironmentError, match=f"unknown environment id '{bad}'"):
            D.make_env(bad)
    with pytest.raises(D.UnknownEnvironmentError, match="unknown environment id 'Walkr2d-v5'"):
        D.make_mixed_dataset("test/walker/unknown-env-v0", [D.RANDOM_ACTOR], 10, env_id="Walkr2d-v5")
    with pytest.raises(D.UnknownEnvironmentError):
        D.rollout(None, "Walkr2d-v5", 5)
    episodes, _ = store
    with pytest.raises(D.UnknownEnvironmentError):
        D.create_minari_dataset("test/walker/unknown-env-v0", episodes[:1], "Walkr2d-v5")
    assert not D._local_dataset_dir("test/walker/unknown-env-v0").exists() and not _staging_left()


def test_bad_actor_files(tmp_path):
    with pytest.raises(InputError, match="behaviour-policy checkpoint not found.*walker2d_sac_020k.pt"):
        load_actor(str(tmp_path / "absent.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CorruptFileError, match="garbage.pt"):
        load_actor(str(garbage))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        load_actor(str(empty))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"actor": {}, "meta": {"obs_dim": 3}, "extra": SquashedGaussianActor}, unsafe)  # a pickled class
    with pytest.raises(UnsafeFileError, match="unsafe.pt"):
        load_actor(str(unsafe))
    actor = SquashedGaussianActor(11, 3, hidden=(8,), low=[-1] * 3, high=[1] * 3)
    meta = {"env_id": ENV, "obs_dim": 11, "act_dim": 3, "hidden": [8], "low": [-1.0] * 3, "high": [1.0] * 3}
    cases = {
        "no-meta.pt": ({"actor": actor.state_dict()}, r"keys 'actor' .* and 'meta'"),
        "bad-dim.pt": ({"actor": actor.state_dict(), "meta": {**meta, "obs_dim": "11"}}, r"meta\['obs_dim'\]"),
        "bad-box.pt": ({"actor": actor.state_dict(), "meta": {**meta, "low": [-1.0]}}, r"meta\['low'\]"),
        "mismatch.pt": ({"actor": actor.state_dict(), "meta": {**meta, "hidden": [16]}}, "does not fit meta"),
        "nan.pt": ({"actor": {**actor.state_dict(), "mu.bias": torch.full((3,), float("nan"))}, "meta": meta}, "NaN"),
    }
    for name, (obj, pattern) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(InputError, match=pattern) as info:
            load_actor(str(tmp_path / name))
        assert name in str(info.value)


# ---------------------------------------------------------------------------------------------
# Shipped behaviour checkpoints


def test_shipped_checkpoints_load_weights_only_and_act_deterministically():
    shipped = shipped_checkpoints()
    assert sorted(shipped) == ([f"halfcheetah_sac_{k}.pt" for k in ("080k", "200k")] + ["hopper_sac_120k.pt"]
                               + [f"walker2d_sac_{k}.pt" for k in ("020k", "100k", "140k", "180k", "200k")])
    assert (CHECKPOINT_DIR / "README.md").is_file()
    sizes = {"walker2d": ("Walker2d-v5", 17, 6), "halfcheetah": ("HalfCheetah-v5", 17, 6), "hopper": ("Hopper-v5", 11, 3)}
    for name, path in shipped.items():
        env_id, obs_dim, act_dim = sizes[name.split("_")[0]]
        obs = torch.linspace(-1, 1, obs_dim).reshape(1, obs_dim)
        state = torch.load(path, weights_only=True)  # a self-describing model file of plain data
        assert state["format"] == "energyflow-model/1" and state["class"] == "energyflow.SquashedGaussianActor"
        actor, meta = load_actor(name)  # by file name, from any working directory
        assert meta["env_id"] == env_id and (meta["obs_dim"], meta["act_dim"]) == (obs_dim, act_dim)
        again, _ = load_actor(str(path))
        with torch.no_grad():
            a = actor(obs, deterministic=True)
            assert torch.equal(a, again(obs, deterministic=True))
            noisy = [m(obs, generator=torch.Generator().manual_seed(3)) for m in (actor, again)]
        assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], a)
        assert torch.all(a.abs() <= 1.0)


def test_actor_path_resolution(tmp_path, monkeypatch):
    shipped = shipped_checkpoints()["walker2d_sac_020k.pt"]
    assert resolve_actor_path("walker2d_sac_020k.pt") == str(shipped)
    # paths into the former assets/behaviour/ folder (configs of earlier runs) still resolve
    assert resolve_actor_path("assets/behaviour/walker2d_sac_020k.pt") == str(shipped)
    assert resolve_actor_path("/old/checkout/assets/behaviour/walker2d_sac_020k.pt") == str(shipped)
    with pytest.raises(InputError):
        resolve_actor_path("elsewhere/walker2d_sac_020k.pt")  # another folder is not silently redirected
    own = tmp_path / "walker2d_sac_020k.pt"  # an existing file wins
    own.write_bytes(shipped.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert resolve_actor_path("walker2d_sac_020k.pt") == "walker2d_sac_020k.pt"
