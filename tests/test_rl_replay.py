"""SAC replay buffers as medium-replay datasets: ``train_sac(save_replay=True)`` saves the buffer
at each checkpoint (actions back in the environment's box, terminals apart from time-outs), and
``make_replay_dataset`` / ``energyflow data make-replay`` store it as a Minari dataset whose flat
transitions are exactly the buffer's.  Bad buffer files get one line naming the file and key."""
import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
pytest.importorskip("minari")
pytest.importorskip("mujoco")
SAC = pytest.importorskip("stable_baselines3").SAC

from domains.rl import datasets as D  # noqa: E402
from domains.rl.behaviour import save_replay_buffer, train_sac  # noqa: E402
from energyflow.cli import main  # noqa: E402
from energyflow.errors import InputError  # noqa: E402

ENV = "Hopper-v5"


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path


def _buffer_with_timeouts(tmp_path):
    """A SAC replay buffer (no gradient step: learning_starts beyond the run) on Hopper with a
    25-step time limit, so that both terminations and time-outs occur."""
    env = gym.make(ENV, max_episode_steps=25)
    model = SAC("MlpPolicy", env, seed=0, learning_starts=10_000, device="cpu", buffer_size=1000)
    model.learn(total_timesteps=150)
    path = str(tmp_path / "replay.npz")
    assert save_replay_buffer(model.replay_buffer, env.action_space, path) == 150
    return path


def test_train_sac_saves_the_buffer_at_each_checkpoint(tmp_path):
    records = train_sac(ENV, 120, str(tmp_path / "sac"), checkpoint_every=60, learning_starts=1000,
                        eval_episodes=1, save_replay=True)
    assert [r["steps"] for r in records] == [60, 120]
    a, b = (D.load_replay_buffer(r["replay"]) for r in records)
    # the buffer as it stood at each checkpoint: the later one extends the earlier one
    assert len(b["rewards"]) == records[1]["replay_transitions"] > len(a["rewards"]) == records[0]["replay_transitions"]
    for key in D.REPLAY_ARRAYS:
        np.testing.assert_array_equal(b[key][:len(a[key])], a[key])
    assert b["terminals"].any() and np.abs(b["actions"]).max() <= 1.0


def test_replay_dataset_holds_the_buffer_exactly(store):
    path = _buffer_with_timeouts(store)
    arrays = D.load_replay_buffer(path)
    assert arrays["timeouts"].any() and arrays["terminals"].any()
    assert not (arrays["timeouts"] & arrays["terminals"]).any()
    ds = D.make_replay_dataset("test/hopper/replay-v0", path, ENV)
    assert ds.total_steps == 150
    tr = D.load_minari("test/hopper/replay-v0")
    np.testing.assert_allclose(tr.observations.numpy(), arrays["observations"])
    np.testing.assert_allclose(tr.next_observations.numpy(), arrays["next_observations"])
    np.testing.assert_allclose(tr.actions.numpy(), arrays["actions"])
    np.testing.assert_allclose(tr.rewards.numpy(), arrays["rewards"], rtol=1e-6)
    np.testing.assert_array_equal(tr.terminals.numpy() > 0, arrays["terminals"])
    # a time-out keeps the bootstrap; the episode in progress at the save is cut as a time-out too
    ends = arrays["timeouts"].copy()
    ends[-1] |= not arrays["terminals"][-1]
    np.testing.assert_array_equal(tr.timeouts.numpy() > 0, ends)
    assert tr.num_episodes == int((arrays["terminals"] | ends).sum())


def test_cli_make_replay(store, capsys):
    path = _buffer_with_timeouts(store)
    assert main(["data", "make-replay", "test/hopper/replay-v1", "--replay", path, "--env", ENV]) == 0
    assert "150 steps" in capsys.readouterr().out
    assert main(["data", "make-replay", "test/hopper/replay-v1", "--replay", path, "--env", ENV]) == 2
    assert "already exists" in capsys.readouterr().err


def _write(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def test_bad_replay_files_are_named(store):
    good = D.load_replay_buffer(_buffer_with_timeouts(store))
    with pytest.raises(D.DatasetNotFoundError, match="not found"):
        D.load_replay_buffer(str(store / "missing.npz"))
    (store / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(D.InvalidDatasetError, match="junk.npz is not a readable"):
        D.load_replay_buffer(str(store / "junk.npz"))
    pickled = _write(store / "pickled.npz", **{**good, "rewards": np.array([{"a": 1}] * 150, dtype=object)})
    with pytest.raises(D.InvalidDatasetError, match="pickled.npz is not a readable"):  # never unpickled
        D.load_replay_buffer(pickled)
    no_key = _write(store / "nokey.npz", **{k: v for k, v in good.items() if k != "timeouts"})
    with pytest.raises(D.InvalidDatasetError, match=r"lacks key\(s\) \['timeouts'\]"):
        D.load_replay_buffer(no_key)
    short = _write(store / "short.npz", **{**good, "actions": good["actions"][:-1]})
    with pytest.raises(D.InvalidDatasetError, match="'actions' has shape"):
        D.load_replay_buffer(short)
    nan = good["rewards"].copy()
    nan[3] = np.nan
    with pytest.raises(D.InvalidDatasetError, match="'rewards' holds 1 NaN"):
        D.load_replay_buffer(_write(store / "nan.npz", **{**good, "rewards": nan}))
    shuffled = {k: v[::-1].copy() for k, v in good.items()}
    with pytest.raises(D.InvalidDatasetError, match="not a buffer of consecutive transitions"):
        D.load_replay_buffer(_write(store / "shuffled.npz", **shuffled))
    with pytest.raises(InputError, match="does not fit Walker2d-v5"):
        D.make_replay_dataset("test/walker/replay-v0", _write(store / "ok.npz", **good), "Walker2d-v5")
