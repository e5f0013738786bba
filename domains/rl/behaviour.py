"""Behaviour policies for building offline datasets: SAC training (Stable-Baselines3) and the
squashed-Gaussian actor that replays the saved weights without it.

Checkpoints hold the *actor only* (a few hundred KB): enough to roll out stochastic actions, which
is all dataset generation needs.  Stable-Baselines3 is needed to train, not to roll out.

A checkpoint is a self-describing energyflow model file (:mod:`energyflow.models`, format
``energyflow-model/1``): the core network :class:`energyflow.nets.SquashedGaussianActor`, its
constructor arguments and weights, and a ``meta`` dict of plain Python values (``env_id``,
``obs_dim``, ``act_dim``, ``hidden``, ``low``, ``high``, ``seed``, ``steps``, ``eval_return``).  So
``energyflow.load_model(file)`` rebuilds the actor in a process that never imports ``domains``, and
loading one never runs code (``torch.load(weights_only=True)``).  :func:`load_actor` also reads the
earlier format, a weights-only ``{"actor": state_dict, "meta": {...}}``.  The Walker2d-v5
checkpoints that build the default dataset ship inside the package, in
``domains/rl/behaviour_checkpoints/`` (see its README); :func:`resolve_actor_path` finds them by
file name.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from energyflow.errors import CorruptFileError, InputError
from energyflow.files import append_jsonl, atomic_open, load_torch
from energyflow.models import MODEL_FORMAT, load_model, save_model_file
from energyflow.nets import SquashedGaussianActor

__all__ = ["SquashedGaussianActor", "train_sac", "load_actor", "CHECKPOINT_DIR", "shipped_checkpoints",
           "resolve_actor_path", "save_replay_buffer"]

#: The folder of the behaviour checkpoints shipped with the package (package data, so it exists in
#: wheel installs as well as in the source tree).
CHECKPOINT_DIR: Path = Path(__file__).resolve().parent / "behaviour_checkpoints"

# Where the shipped checkpoints lived before they became package data; configs saved by earlier
# runs name them there, and such paths still resolve to the shipped files.
_LEGACY_DIR = ("assets", "behaviour")

#: The registered name of the actor's class in model files.
ACTOR_CLASS = "energyflow.SquashedGaussianActor"
LOG_STD_MIN, LOG_STD_MAX = SquashedGaussianActor.LOG_STD_MIN, SquashedGaussianActor.LOG_STD_MAX


def shipped_checkpoints() -> dict[str, Path]:
    """The shipped behaviour checkpoints: file name (``walker2d_sac_020k.pt``) → path."""
    if not CHECKPOINT_DIR.is_dir():  # pragma: no cover - a broken install
        return {}
    return {p.name: p for p in sorted(CHECKPOINT_DIR.glob("*.pt"))}


def resolve_actor_path(spec: str | os.PathLike) -> str:
    """The file an actor reference names.

    ``spec`` is a path to a checkpoint (absolute, or relative to the working directory), or the file
    name of a shipped checkpoint (``walker2d_sac_020k.pt``, see :data:`CHECKPOINT_DIR`), which is how
    recipes name them so that they work from any directory and in wheel installs.  A path into the
    former ``assets/behaviour/`` folder that no longer exists resolves to the shipped file of the
    same name.

    Raises:
        InputError: no such file and no shipped checkpoint of that name.
    """
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    head, name = os.path.split(spec)
    shipped = shipped_checkpoints()
    legacy = tuple(Path(head).parts[-2:]) == _LEGACY_DIR
    if name in shipped and (not head or legacy):
        return str(shipped[name])
    names = ", ".join(shipped) or "none"
    raise InputError(f"behaviour-policy checkpoint not found: {spec} (expected a checkpoint file written by "
                     f"'energyflow data train-behaviour', or the name of a shipped one: {names})")


def _checked_meta(meta, path: str) -> dict:
    """The checkpoint's ``meta`` dict, with every field the actor needs checked (one-line errors)."""
    where = f"behaviour-policy checkpoint {path}"
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{where}: key 'meta' must be a dict of plain values, got {type(meta).__name__}")
    for key in ("obs_dim", "act_dim"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
            raise CorruptFileError(f"{where}: meta[{key!r}] must be a positive integer, got {meta.get(key)!r}")
    hidden = meta.get("hidden")
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise CorruptFileError(f"{where}: meta['hidden'] must be a list of positive layer widths, got {hidden!r}")
    for key in ("low", "high"):
        box = meta.get(key)
        if (not isinstance(box, (list, tuple)) or len(box) != meta["act_dim"]
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in box)):
            raise CorruptFileError(f"{where}: meta[{key!r}] must be {meta['act_dim']} finite numbers (the action "
                                   f"box), got {box!r}")
    return meta


def load_actor(path: str | os.PathLike, map_location: str = "cpu") -> tuple[SquashedGaussianActor, dict]:
    """Load an actor checkpoint written by :func:`train_sac`; returns ``(actor, meta)``.

    ``path`` goes through :func:`resolve_actor_path` (a file, or a shipped checkpoint's name).  The
    file is a self-describing model file (rebuilt by :func:`energyflow.models.load_model`) or an
    earlier ``{"actor": state_dict, "meta": {...}}`` checkpoint; either is read weights-only
    (nothing in it can run code) and checked: a missing, truncated or foreign file, a model file of
    another class, a missing ``actor``/``meta`` key, a bad meta field, weights that do not fit the
    meta or non-finite weights raise an :class:`~energyflow.errors.InputError` naming the file and
    the key.
    """
    path = resolve_actor_path(path)
    what = "behaviour-policy checkpoint"
    state = load_torch(path, what=what, map_location=map_location)
    if isinstance(state, dict) and "format" in state:
        actor, meta = _load_model_file(path, state, map_location)
    elif isinstance(state, dict) and {"actor", "meta"} <= set(state):
        actor, meta = _load_legacy(path, state)
    else:
        have = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CorruptFileError(f"{what} {path} must be an energyflow model file (format {MODEL_FORMAT!r}) or hold "
                               f"the keys 'actor' (a state dict) and 'meta' (a dict); it has {have}")
    if not all(torch.isfinite(t).all() for t in actor.state_dict().values()):
        key = "state_dict" if "format" in state else "actor"
        raise CorruptFileError(f"{what} {path}: key {key!r} holds NaN or infinite weights")
    return actor.eval(), meta


def _load_model_file(path: str, record: dict, map_location: str) -> tuple[SquashedGaussianActor, dict]:
    """The actor of a self-describing model file, its constructor arguments checked against its meta."""
    where = f"behaviour-policy checkpoint {path}"
    if record.get("class") != ACTOR_CLASS:
        raise CorruptFileError(f"{where} is a model file of {record.get('class')!r}, not of a behaviour actor "
                               f"({ACTOR_CLASS!r})")
    meta = _checked_meta(record.get("meta"), path)
    actor = load_model(path, map_location=map_location).net  # one-line errors naming the file
    init = actor.init_kwargs
    stored = (init["obs_dim"], init["act_dim"], [int(h) for h in init["hidden"]])
    if stored != (meta["obs_dim"], meta["act_dim"], list(meta["hidden"])):
        raise CorruptFileError(f"{where}: key 'init' (obs_dim {stored[0]}, act_dim {stored[1]}, hidden {stored[2]}) "
                               f"does not fit meta (obs_dim {meta['obs_dim']}, act_dim {meta['act_dim']}, hidden "
                               f"{list(meta['hidden'])})")
    return actor, meta


def _load_legacy(path: str, state: dict) -> tuple[SquashedGaussianActor, dict]:
    """The actor of an earlier ``{"actor": state_dict, "meta": {...}}`` checkpoint."""
    what = "behaviour-policy checkpoint"
    meta = _checked_meta(state["meta"], path)
    weights = state["actor"]
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise CorruptFileError(f"{what} {path}: key 'actor' must be a state dict (parameter name → tensor)")
    actor = SquashedGaussianActor(meta["obs_dim"], meta["act_dim"], list(meta["hidden"]),
                                  [float(v) for v in meta["low"]], [float(v) for v in meta["high"]])
    try:
        actor.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CorruptFileError(f"{what} {path}: key 'actor' does not fit meta (obs_dim {meta['obs_dim']}, act_dim "
                               f"{meta['act_dim']}, hidden {list(meta['hidden'])}): {detail}") from None
    return actor, meta


def _export_actor(model, path: str, meta: dict) -> None:
    """Save SB3's actor as a self-describing model file (weights, constructor arguments and
    plain-Python meta; see :mod:`energyflow.models`), atomically."""
    sd = {k: v.detach().cpu().clone() for k, v in model.policy.actor.state_dict().items()
          if k.startswith(("latent_pi", "mu", "log_std"))}
    space = model.action_space
    full = {**meta, "low": [float(v) for v in space.low], "high": [float(v) for v in space.high]}
    actor = SquashedGaussianActor(int(full["obs_dim"]), int(full["act_dim"]), [int(h) for h in full["hidden"]],
                                  full["low"], full["high"])
    actor.load_state_dict(sd, strict=False)
    save_model_file(path, actor, meta=full)


def save_replay_buffer(buffer, action_space, path: str) -> int:
    """Write the filled part of a Stable-Baselines3 ``ReplayBuffer`` (one environment) as a plain
    ``.npz`` of arrays, atomically; returns the number of transitions.

    The file holds ``observations``/``next_observations`` ``[N, obs_dim]``, ``actions`` ``[N, act_dim]``
    (in the environment's action box: SB3 stores them rescaled to [-1, 1]), ``rewards``,
    ``terminals`` (true terminations) and ``timeouts`` (time-limit ends) ``[N]``, in the order SAC
    collected them; an episode ends at a terminal or a timeout, and the last one may be in progress.
    It holds no pickled objects: :func:`domains.rl.datasets.load_replay_buffer` reads it with
    ``allow_pickle=False``.
    """
    if buffer.n_envs != 1:
        raise ValueError(f"save_replay_buffer handles one environment, the buffer has {buffer.n_envs}")
    if buffer.full:  # pragma: no cover - buffers here are larger than the training run
        raise ValueError("the replay buffer has wrapped around; raise its buffer_size")
    n = buffer.pos
    low, high = np.asarray(action_space.low, np.float64), np.asarray(action_space.high, np.float64)
    scaled = buffer.actions[:n, 0].astype(np.float64)
    actions = (low + 0.5 * (scaled + 1.0) * (high - low)).astype(np.float32)
    dones = buffer.dones[:n, 0].astype(bool)
    timeouts = buffer.timeouts[:n, 0].astype(bool)
    arrays = {"observations": buffer.observations[:n, 0].astype(np.float32),
              "next_observations": buffer.next_observations[:n, 0].astype(np.float32),
              "actions": actions, "rewards": buffer.rewards[:n, 0].astype(np.float32),
              "terminals": dones & ~timeouts, "timeouts": timeouts}
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return int(n)


def train_sac(env_id: str, total_steps: int, out_dir: str, checkpoint_every: int = 25_000, seed: int = 0,
              eval_episodes: int = 5, learning_starts: int = 10_000, num_threads: int = 1,
              save_replay: bool = False) -> list[dict]:
    """Train SAC (Stable-Baselines3 defaults) on a Gymnasium environment, saving the actor every
    ``checkpoint_every`` steps as ``<out_dir>/actor_<steps>.pt`` with its evaluation return.

    With ``save_replay``, SAC's replay buffer as it stands at each checkpoint is saved beside the
    actor as ``<out_dir>/replay_<steps>.npz`` (:func:`save_replay_buffer`): every transition SAC
    collected up to that policy, its uniformly random start (``learning_starts``) included, which is
    what a D4RL-style ``medium-replay`` dataset is (``energyflow data make-replay``).

    Returns the list of checkpoint records (also written to ``<out_dir>/checkpoints.jsonl``).
    """
    try:
        import gymnasium as gym
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("training behaviour policies needs: pip install 'energyflow[rl]'") from err
    torch.set_num_threads(num_threads)
    os.makedirs(out_dir, exist_ok=True)
    env = gym.make(env_id)
    eval_env = gym.make(env_id)
    model = SAC("MlpPolicy", env, seed=seed, learning_starts=learning_starts, verbose=0, device="cpu",
                buffer_size=max(int(total_steps), 1_000_000))  # SB3 default; never wraps
    hidden = [m.out_features for m in model.policy.actor.latent_pi if isinstance(m, nn.Linear)]
    meta = {"env_id": env_id, "obs_dim": int(env.observation_space.shape[0]),
            "act_dim": int(env.action_space.shape[0]), "hidden": hidden, "seed": seed}
    records: list[dict] = []
    log_path = os.path.join(out_dir, "checkpoints.jsonl")
    start = time.time()

    class Checkpoint(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % checkpoint_every == 0:
                returns = []
                for ep in range(eval_episodes):
                    obs, _ = eval_env.reset(seed=10_000 + ep)
                    done, total = False, 0.0
                    while not done:
                        action, _ = model.predict(obs, deterministic=True)
                        obs, r, term, trunc, _ = eval_env.step(action)
                        total += float(r)
                        done = term or trunc
                    returns.append(total)
                path = os.path.join(out_dir, f"actor_{self.num_timesteps}.pt")
                rec = {"steps": self.num_timesteps, "return_mean": float(np.mean(returns)),
                       "return_std": float(np.std(returns)), "seconds": round(time.time() - start, 1), "path": path}
                _export_actor(model, path, {**meta, "steps": self.num_timesteps, "eval_return": rec["return_mean"]})
                if save_replay:
                    rec["replay"] = os.path.join(out_dir, f"replay_{self.num_timesteps}.npz")
                    rec["replay_transitions"] = save_replay_buffer(model.replay_buffer, env.action_space,
                                                                   rec["replay"])
                records.append(rec)
                append_jsonl(log_path, rec)
            return True

    model.learn(total_timesteps=total_steps, callback=Checkpoint())
    return records
