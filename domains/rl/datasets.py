"""Offline RL datasets: load Minari datasets and classic D4RL HDF5 files as flat transitions, and
build Minari datasets from behaviour-policy rollouts.

Conventions:
    * A transition is ``(s, a, r, s', terminal, timeout)``.  ``terminal`` is a *true* termination
      (the bootstrap is cut: ``y = r``); ``timeout`` is a truncation (time limit, end of the data):
      the bootstrap is **not** cut (``y = r + γ V(s')``).  Both are float 0/1.
    * Scores are D4RL-normalised: ``100 · (R − R_random) / (R_expert − R_random)``.
    * Minari datasets live in the local store ``$MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``);
      ids look like ``namespace/name-v0`` (Minari requires the ``-vN`` version).

Bad input fails early with one line naming the file or key (:class:`~energyflow.errors.InputError`
subclasses, which the CLI prints without a traceback): a file that is not HDF5, arrays of different
lengths, NaN/inf values, a missing key, an unknown environment id, a corrupt Minari dataset.

Writing a Minari dataset is all-or-nothing: it is built in a hidden staging folder inside the store
and renamed into place only when complete, so an error, a full disk or Ctrl-C leaves the store as
it was (with ``overwrite=True``, the old dataset stays until the new one is complete).

Only numpy and torch are imported at module load; gymnasium, minari and h5py are imported when a
function needs them (the ``rl`` extra), with a clear error when they are missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from energyflow.errors import CorruptFileError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import gymnasium as gym
    from minari import MinariDataset
    from minari.data_collector import EpisodeBuffer

__all__ = [
    "DatasetNotFoundError",
    "DatasetExistsError",
    "InvalidDatasetError",
    "UnknownEnvironmentError",
    "make_env",
    "RANDOM_ACTOR",
    "REF_SCORES",
    "ref_scores_for",
    "Transitions",
    "load_minari",
    "transitions_from_minari",
    "load_d4rl_hdf5",
    "load_dataset",
    "rollout",
    "create_minari_dataset",
    "make_mixed_dataset",
    "load_replay_buffer",
    "replay_episodes",
    "make_replay_dataset",
    "normalized_score",
]

#: D4RL reference returns ``(random, expert)`` per MuJoCo locomotion task (the D4RL v2 values).
REF_SCORES: dict[str, tuple[float, float]] = {
    "Walker2d": (1.629008, 4592.3),
    "Hopper": (-20.272305, 3234.3),
    "HalfCheetah": (-280.178953, 12135.0),
}

_RL_EXTRA = "pip install 'energyflow[rl]'  (gymnasium[mujoco], minari, stable-baselines3)"
_CREATE_HINT = (
    "create it locally with `energyflow data ...` (see `energyflow data --help`) or with "
    "domains.rl.datasets.make_mixed_dataset / create_minari_dataset"
)


class DatasetNotFoundError(InputError, FileNotFoundError):
    """A dataset file or Minari id that is not there (also a ``FileNotFoundError``)."""


class DatasetExistsError(InputError, FileExistsError):
    """A Minari id that already exists, written without ``overwrite`` (also a ``FileExistsError``)."""


class InvalidDatasetError(CorruptFileError):
    """A dataset that exists but cannot be used: not the expected format, a missing key, arrays of
    different lengths, NaN/inf values."""


class UnknownEnvironmentError(InputError):
    """An environment id that Gymnasium does not know."""


def _require_minari():
    try:
        import minari
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"Minari datasets need the rl extra: {_RL_EXTRA}") from err
    return minari


def _require_gym():
    try:
        import gymnasium as gym
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"environments need the rl extra: {_RL_EXTRA}") from err
    return gym


def _require_h5py():
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading D4RL HDF5 files needs h5py: pip install h5py") from err
    return h5py


def make_env(env_id: str, **kwargs: Any) -> "gym.Env":
    """``gym.make(env_id, **kwargs)``, with an unknown id reported as one line.

    Raises:
        UnknownEnvironmentError: Gymnasium does not know ``env_id`` (wrong name, namespace or version,
            or a dependency of the environment that is missing).
    """
    gym = _require_gym()
    if not isinstance(env_id, str) or not env_id:
        raise UnknownEnvironmentError(f"unknown environment id {env_id!r}: expected a Gymnasium id such as "
                                      f"'Walker2d-v5'")
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UnknownEnvironmentError(f"unknown environment id {env_id!r}: expected a registered Gymnasium id "
                                      f"such as 'Walker2d-v5' (gymnasium: {reason})") from None


def ref_scores_for(env_id: str) -> tuple[float, float]:
    """D4RL ``(ref_min, ref_max)`` returns for an environment id, matched on its name prefix,
    case-insensitively and ignoring a ``namespace/`` (``"Walker2d-v5"``, ``"walker2d-medium-v2"``).

    Raises:
        KeyError: when no entry of :data:`REF_SCORES` matches.
    """
    name = env_id.rsplit("/", 1)[-1].lower()
    for key, scores in REF_SCORES.items():
        if name.startswith(key.lower()):
            return scores
    raise KeyError(f"no D4RL reference scores for {env_id!r}; known: {sorted(REF_SCORES)}")


def _ref_scores_or_none(env_id: Optional[str]) -> tuple[Optional[float], Optional[float]]:
    if env_id is None:
        return None, None
    try:
        return ref_scores_for(env_id)
    except KeyError:
        return None, None


def normalized_score(returns, env_id: Optional[str] = None, ref_min: Optional[float] = None,
                     ref_max: Optional[float] = None) -> np.ndarray:
    """D4RL-normalised score ``100 · (R − ref_min) / (ref_max − ref_min)`` (float64 array).

    ``ref_min``/``ref_max`` that are not given come from :func:`ref_scores_for` ``(env_id)``.
    Note that ``minari.get_normalized_score`` returns the same quantity divided by 100.
    """
    if ref_min is None or ref_max is None:
        if env_id is None:
            raise ValueError("normalized_score needs env_id or both ref_min and ref_max")
        lo, hi = ref_scores_for(env_id)
        ref_min = lo if ref_min is None else ref_min
        ref_max = hi if ref_max is None else ref_max
    if ref_max == ref_min:
        raise ValueError(f"ref_max equals ref_min ({ref_min}): the score is undefined")
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


# ---------------------------------------------------------------------------------------------
# Transitions


def _discounted_reverse_cumsum(r: np.ndarray, gamma: float, block: int = 256) -> np.ndarray:
    """``G_t = Σ_{k ≥ t} γ^{k−t} r_k`` for one episode, in float64, computed backwards by blocks:
    inside a block one triangular mat-vec (only non-negative powers of γ, so nothing overflows),
    across blocks the carried ``G`` of the block's first step."""
    T = len(r)
    out = np.empty(T, dtype=np.float64)
    k = np.arange(min(block, T))
    diff = k[None, :] - k[:, None]
    tri = np.where(diff >= 0, gamma ** np.clip(diff, 0, None), 0.0)
    carry = 0.0
    for end in range(T, 0, -block):
        start = max(0, end - block)
        n = end - start
        out[start:end] = tri[:n, :n] @ r[start:end] + gamma ** (n - np.arange(n)) * carry
        carry = out[start]
    return out


def _episode_slices(episode_ids: np.ndarray) -> list[slice]:
    """Slices of the consecutive runs of equal episode ids."""
    if len(episode_ids) == 0:
        return []
    cuts = np.flatnonzero(episode_ids[1:] != episode_ids[:-1]) + 1
    bounds = np.concatenate([[0], cuts, [len(episode_ids)]])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class Transitions:
    """Flat offline-RL transitions (float32 tensors, ``episode_ids`` int64).

    Attributes:
        observations: ``[N, obs_dim]`` states s.
        actions: ``[N, act_dim]`` actions a.
        rewards: ``[N]`` rewards r.
        next_observations: ``[N, obs_dim]`` successor states s'.
        terminals: ``[N]`` 1.0 for a true termination (cut the bootstrap), else 0.0.
        timeouts: ``[N]`` 1.0 where the episode was truncated after this step (time limit or end of
            the data): the bootstrap from s' is **not** cut.
        episode_ids: ``[N]`` episode of each transition; an episode's transitions are contiguous
            and in time order.
        env_id: the Gymnasium id the data came from, when known.
        ref_min_score, ref_max_score: D4RL-style reference returns for normalised scores, when known.
    """

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    next_observations: Tensor
    terminals: Tensor
    timeouts: Tensor
    episode_ids: Tensor
    env_id: Optional[str] = None
    ref_min_score: Optional[float] = None
    ref_max_score: Optional[float] = None

    def __post_init__(self):
        n = self.observations.shape[0]
        if self.observations.dim() != 2 or self.actions.dim() != 2:
            raise ValueError(f"observations and actions must be [N, dim]; got {tuple(self.observations.shape)} "
                             f"and {tuple(self.actions.shape)}")
        for name in ("actions", "rewards", "next_observations", "terminals", "timeouts", "episode_ids"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows, observations {n}")
        if self.next_observations.shape != self.observations.shape:
            raise ValueError(f"next_observations {tuple(self.next_observations.shape)} != observations "
                             f"{tuple(self.observations.shape)}")

    @classmethod
    def from_numpy(cls, observations, actions, rewards, next_observations, terminals, timeouts, episode_ids,
                   env_id: Optional[str] = None, ref_min_score: Optional[float] = None,
                   ref_max_score: Optional[float] = None) -> "Transitions":
        """Build from arrays (converted to float32 / int64 tensors)."""
        f = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32))  # noqa: E731
        return cls(f(observations), f(actions), f(rewards).reshape(-1), f(next_observations),
                   f(terminals).reshape(-1), f(timeouts).reshape(-1),
                   torch.as_tensor(np.asarray(episode_ids, dtype=np.int64)).reshape(-1), env_id,
                   None if ref_min_score is None else float(ref_min_score),
                   None if ref_max_score is None else float(ref_max_score))

    def __len__(self) -> int:
        return int(self.observations.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def num_episodes(self) -> int:
        return len(_episode_slices(self.episode_ids.cpu().numpy()))

    def returns_to_go(self, gamma: float) -> Tensor:
        """``[N]`` discounted reward-to-go within each episode, ``G_t = r_t + γ G_{t+1}``, ending at the
        episode's last stored transition (no bootstrap past a time-out)."""
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        r = self.rewards.detach().cpu().double().numpy()
        out = np.empty_like(r)
        for s in _episode_slices(self.episode_ids.cpu().numpy()):
            out[s] = _discounted_reverse_cumsum(r[s], gamma)
        return torch.as_tensor(out, dtype=torch.float32, device=self.rewards.device)

    def episode_returns(self) -> Tensor:
        """``[E]`` undiscounted return of each episode, in storage order."""
        r = self.rewards.detach().cpu().double().numpy()
        out = [r[s].sum() for s in _episode_slices(self.episode_ids.cpu().numpy())]
        return torch.as_tensor(np.asarray(out), dtype=torch.float32)

    def observation_stats(self) -> tuple[Tensor, Tensor]:
        """``(mean, std)``, each ``[obs_dim]``, of the observations; std floored at 1e-3."""
        obs = self.observations.double()
        mean = obs.mean(0)
        std = obs.std(0, correction=0).clamp_min(1e-3)
        return mean.float(), std.float()

    def normalized(self, mean, std) -> "Transitions":
        """Copy with observations and next observations mapped to ``(s − mean) / std``."""
        mean = torch.as_tensor(mean, dtype=torch.float32, device=self.observations.device)
        std = torch.as_tensor(std, dtype=torch.float32, device=self.observations.device)
        return dataclasses.replace(self, observations=(self.observations - mean) / std,
                                   next_observations=(self.next_observations - mean) / std)

    def scaled_rewards(self, scale: float, shift: float = 0.0) -> "Transitions":
        """Copy with rewards ``scale · r + shift``."""
        return dataclasses.replace(self, rewards=self.rewards * scale + shift)

    def check_spaces(self, observation_space, action_space) -> None:
        """Raise ``ValueError`` when the data does not fit the environment's Box spaces (e.g. a dataset
        recorded on another environment)."""
        obs_shape, act_shape = tuple(observation_space.shape), tuple(action_space.shape)
        if int(np.prod(obs_shape)) != self.obs_dim or int(np.prod(act_shape)) != self.act_dim:
            raise ValueError(
                f"dataset (env {self.env_id}) does not fit the environment: dataset observations "
                f"({self.obs_dim},) and actions ({self.act_dim},) vs observation space {obs_shape} and "
                f"action space {act_shape}")

    def to(self, device) -> "Transitions":
        """Copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_finite(source: str, **arrays: np.ndarray) -> None:
    """Raise :class:`InvalidDatasetError` naming ``source`` and the first array holding NaN or inf."""
    for key, values in arrays.items():
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))[0]) if values.ndim else 0
            raise InvalidDatasetError(f"{source}: key {key!r} holds {int(bad.sum())} NaN/inf values (first in row "
                                      f"{row}); every value must be finite")


def _as_float_array(source: str, key: str, values: Any) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InvalidDatasetError(f"{source}: key {key!r} is not numeric ({err})") from None


# ---------------------------------------------------------------------------------------------
# Loading


def _local_dataset_dir(dataset_id: str):
    from minari.storage.datasets_root_dir import get_dataset_path

    return get_dataset_path(dataset_id)


def _missing_message(dataset_id: str) -> str:
    minari = _require_minari()
    root = _local_dataset_dir(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            local = sorted(minari.list_local_datasets())
        except Exception:  # a broken store must not hide the real message
            local = []
    shown = ", ".join(local[:10]) + (", ..." if len(local) > 10 else "") if local else "none"
    return (f"Minari dataset {dataset_id!r} is not in the local store {root} (MINARI_DATASETS_PATH); "
            f"local datasets: {shown}. To get it: {_CREATE_HINT}; or fetch a remote dataset with "
            f"load_minari({dataset_id!r}, download=True) (needs internet); or point MINARI_DATASETS_PATH "
            f"at the store that holds it.")


def load_minari(dataset_id: str, download: bool = False) -> Transitions:
    """Load a Minari dataset as flat :class:`Transitions`.

    The local store is checked first, without touching the network: a missing dataset raises
    ``FileNotFoundError`` at once unless ``download=True``, which calls ``minari.download_dataset``
    (network failures become a ``RuntimeError``).
    """
    minari = _require_minari()
    data_path = _local_dataset_dir(dataset_id) / "data"
    if not data_path.exists():
        if not download:
            raise DatasetNotFoundError(_missing_message(dataset_id))
        try:
            minari.download_dataset(dataset_id)
        except Exception as err:
            raise RuntimeError(f"could not download Minari dataset {dataset_id!r} (this needs internet access "
                               f"to the Farama/Hugging Face servers): {type(err).__name__}: {err}") from err
        if not data_path.exists():
            raise RuntimeError(f"download of {dataset_id!r} finished but {data_path} does not exist")
    try:
        dataset = minari.MinariDataset(data_path)
    except Exception as err:  # Minari raises ValueError, AssertionError, JSON and Arrow errors alike
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise InvalidDatasetError(f"Minari dataset {dataset_id!r} at {data_path} cannot be read "
                                  f"({type(err).__name__}: {reason}); recreate it (energyflow data make ... "
                                  f"--overwrite) or delete that folder") from None
    return transitions_from_minari(dataset, source=f"Minari dataset {dataset_id!r} ({data_path})")


def _episodes(dataset: "MinariDataset", source: str):
    """``dataset.iterate_episodes()``, with a storage failure mid-way reported as one line."""
    it = iter(dataset.iterate_episodes())
    while True:
        try:
            ep = next(it)
        except StopIteration:
            return
        except Exception as err:  # a damaged episode file: Arrow, HDF5 or JSON errors
            reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise InvalidDatasetError(f"{source}: an episode cannot be read ({type(err).__name__}: {reason})") from None
        yield ep


def transitions_from_minari(dataset: "MinariDataset", source: Optional[str] = None) -> Transitions:
    """Flatten a ``MinariDataset``: per episode, ``observations[:-1] → s``, ``observations[1:] → s'``,
    ``terminations → terminals``, ``truncations → timeouts``.

    Raises:
        InvalidDatasetError: structured spaces, an episode whose arrays disagree in length, NaN/inf
            values, or no transitions at all; ``source`` (default: the dataset id) names it.
    """
    source = source or f"Minari dataset {dataset.spec.dataset_id!r}"
    cols: dict[str, list] = {k: [] for k in ("obs", "next_obs", "act", "rew", "term", "trunc", "ids")}
    for ep in _episodes(dataset, source):
        if isinstance(ep.observations, (dict, tuple)) or isinstance(ep.actions, (dict, tuple)):
            raise InvalidDatasetError(f"{source} has structured (Dict/Tuple) observations or actions; only Box "
                                      f"spaces are supported")
        where = f"{source}, episode {ep.id}"
        T = len(ep.rewards)
        if T == 0:
            continue
        lengths = {"observations": len(ep.observations), "actions": len(ep.actions),
                   "terminations": len(ep.terminations), "truncations": len(ep.truncations)}
        expected = {"observations": T + 1, "actions": T, "terminations": T, "truncations": T}
        for key, n in lengths.items():
            if n != expected[key]:
                raise InvalidDatasetError(f"{where}: key {key!r} has {n} rows but rewards has {T} (expected "
                                          f"{expected[key]}: observations hold one more row than the steps)")
        obs = _as_float_array(where, "observations", ep.observations).reshape(T + 1, -1)
        act = _as_float_array(where, "actions", ep.actions).reshape(T, -1)
        rew = _as_float_array(where, "rewards", ep.rewards).reshape(T)
        _check_finite(where, observations=obs, actions=act, rewards=rew)
        cols["obs"].append(obs[:-1])
        cols["next_obs"].append(obs[1:])
        cols["act"].append(act)
        cols["rew"].append(rew)
        cols["term"].append(np.asarray(ep.terminations, dtype=np.float32).reshape(T))
        cols["trunc"].append(np.asarray(ep.truncations, dtype=np.float32).reshape(T))
        cols["ids"].append(np.full(T, int(ep.id), dtype=np.int64))
    if not cols["obs"]:
        raise InvalidDatasetError(f"{source} holds no transitions")
    for key in ("obs", "act"):
        dims = {a.shape[1] for a in cols[key]}
        if len(dims) > 1:
            raise InvalidDatasetError(f"{source}: episodes disagree on the width of "
                                      f"{'observations' if key == 'obs' else 'actions'} ({sorted(dims)})")
    spec = dataset.env_spec
    env_id = spec.id if spec is not None else None
    meta = dataset.storage.metadata
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
    if lo is None or hi is None:
        lo, hi = _ref_scores_or_none(env_id)
    cat = lambda k: np.concatenate(cols[k])  # noqa: E731
    return Transitions.from_numpy(cat("obs"), cat("act"), cat("rew"), cat("next_obs"), cat("term"), cat("trunc"),
                                  cat("ids"), env_id=env_id, ref_min_score=lo, ref_max_score=hi)


_D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def load_d4rl_hdf5(path: str, env_id: Optional[str] = None) -> Transitions:
    """Load a classic D4RL HDF5 file (keys ``observations, actions, rewards, terminals, timeouts`` and
    optionally ``next_observations``).

    Episodes end after a row with ``terminals`` or ``timeouts`` set (and at the last row).  Without
    ``next_observations``, s' is the next row within the episode; transitions whose successor is
    unknown (time-outs and an unfinished last row) are dropped, while true terminations are kept with
    ``s' = s`` as a placeholder (masked by ``terminal = 1``), so the termination signal survives.
    Reference scores come from ``env_id`` or, failing that, the file name (``walker2d_medium-v2.hdf5``).
    """
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"D4RL HDF5 file not found: {path}")
    h5py = _require_h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        reason = (str(err).splitlines() or ["unreadable"])[0][:200]
        raise InvalidDatasetError(f"{path} is not a readable HDF5 file ({reason}); expected a D4RL dataset with "
                                  f"the keys {list(_D4RL_KEYS)}") from None
    with f:
        missing = [k for k in _D4RL_KEYS if k not in f]
        if missing:
            raise InvalidDatasetError(f"{path} is missing the D4RL keys {missing} (it has {sorted(f.keys())}); "
                                      f"expected {list(_D4RL_KEYS)} and optionally 'next_observations'")
        keys = [*_D4RL_KEYS, *(["next_observations"] if "next_observations" in f else [])]
        for k in keys:
            if not isinstance(f[k], h5py.Dataset) or f[k].ndim == 0:
                raise InvalidDatasetError(f"{path}: key {k!r} must be an array with one row per transition")
        n = f["observations"].shape[0]
        rows = {k: f[k].shape[0] for k in keys}
        bad = {k: r for k, r in rows.items() if r != n}
        if bad:
            raise InvalidDatasetError(f"{path}: the arrays disagree in length: observations has {n} rows but "
                                      + ", ".join(f"{k} has {r}" for k, r in bad.items())
                                      + "; every key must have one row per transition")
        if n == 0:
            raise InvalidDatasetError(f"{path} holds no transitions (key 'observations' is empty)")
        try:
            data = {k: f[k][()] for k in keys}
        except (OSError, RuntimeError, KeyError) as err:  # a damaged file body
            reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise InvalidDatasetError(f"{path} is truncated or corrupt ({reason})") from None
    obs = _as_float_array(path, "observations", data["observations"]).reshape(n, -1)
    act = _as_float_array(path, "actions", data["actions"]).reshape(n, -1)
    rew = _as_float_array(path, "rewards", data["rewards"]).reshape(n, -1)
    if rew.shape[1] != 1:
        raise InvalidDatasetError(f"{path}: key 'rewards' must hold one number per transition, got shape "
                                  f"{tuple(data['rewards'].shape)}")
    rew = rew.reshape(-1)
    term = np.asarray(data["terminals"]).reshape(n, -1)
    tout = np.asarray(data["timeouts"]).reshape(n, -1)
    for key, flags in (("terminals", term), ("timeouts", tout)):
        if flags.shape[1] != 1:
            raise InvalidDatasetError(f"{path}: key {key!r} must hold one flag per transition, got shape "
                                      f"{tuple(data[key].shape)}")
    term, tout = term.reshape(-1).astype(bool), tout.reshape(-1).astype(bool)
    next_obs = None
    if "next_observations" in data:
        next_obs = _as_float_array(path, "next_observations", data["next_observations"]).reshape(n, -1)
        if next_obs.shape != obs.shape:
            raise InvalidDatasetError(f"{path}: key 'next_observations' has shape {tuple(next_obs.shape)}, "
                                      f"observations {tuple(obs.shape)}; they must match")
        _check_finite(path, next_observations=next_obs)
    _check_finite(path, observations=obs, actions=act, rewards=rew)
    ends = term | tout
    ends[-1] = True
    ids = np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
    if next_obs is not None:
        nxt = next_obs
        keep = np.ones(n, dtype=bool)
    else:
        nxt = np.empty_like(obs)
        nxt[:-1] = obs[1:]
        nxt[term] = obs[term]
        keep = ~ends | term
    if env_id is not None:
        lo, hi = _ref_scores_or_none(env_id)
    else:
        lo, hi = _ref_scores_or_none(os.path.basename(path))
    return Transitions.from_numpy(obs[keep], act[keep], rew[keep], nxt[keep], term[keep], tout[keep], ids[keep],
                                  env_id=env_id, ref_min_score=lo, ref_max_score=hi)


def load_dataset(spec: str, download: bool = False) -> Transitions:
    """A path ending in ``.hdf5``/``.h5`` → :func:`load_d4rl_hdf5`; anything else is a Minari id →
    :func:`load_minari`."""
    if str(spec).lower().endswith((".hdf5", ".h5")):
        return load_d4rl_hdf5(str(spec))
    return load_minari(spec, download=download)


# ---------------------------------------------------------------------------------------------
# Generation


def _make_policy(actor: Any, action_space, deterministic: bool, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Numpy obs ``[obs_dim]`` → action in the box.  ``actor``: None (uniform random), a torch module
    ``actor(obs[1, obs_dim]) -> [1, act_dim]`` (``deterministic``/``generator`` passed when its forward
    takes them), or any callable on a numpy observation."""
    low, high = action_space.low, action_space.high
    if actor is None:
        action_space.seed(seed)
        return lambda obs: np.asarray(action_space.sample())
    if isinstance(actor, nn.Module):
        actor.eval()
        tensors = list(actor.parameters()) + list(actor.buffers())
        device = tensors[0].device if tensors else torch.device("cpu")
        params = inspect.signature(actor.forward).parameters
        kwargs: dict[str, Any] = {}
        if "deterministic" in params:
            kwargs["deterministic"] = deterministic
        if "generator" in params:
            kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)

        def module_policy(obs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                x = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device).reshape(1, -1)
                return actor(x, **kwargs).reshape(-1).cpu().numpy()

        fn = module_policy
    elif callable(actor):
        fn = lambda obs: np.asarray(actor(obs))  # noqa: E731
    else:
        raise TypeError(f"actor must be None, a torch module or a callable, got {type(actor).__name__}")
    return lambda obs: np.clip(np.asarray(fn(obs), dtype=np.float64).reshape(low.shape), low, high)


def rollout(actor_or_fn: Any, env_id: str, num_steps: int, seed: int = 0, deterministic: bool = False,
            env_kwargs: Optional[dict] = None) -> list["EpisodeBuffer"]:
    """Roll a policy out for exactly ``num_steps`` environment steps in ``gym.make(env_id, **env_kwargs)``.

    Episode ``i`` is reset with seed ``seed + i``; actions are stochastic unless ``deterministic``
    and are clipped to the action box (the stored action is the executed one).  ``actor_or_fn`` is
    a torch module (e.g. :class:`~domains.rl.behaviour.SquashedGaussianActor`), a callable on numpy
    observations, or None for uniform random actions.  The last episode is marked truncated when the
    step budget ends it.

    Returns:
        ``minari.data_collector.EpisodeBuffer`` per episode: observations ``[T+1, obs_dim]``,
        actions ``[T, act_dim]``, rewards/terminations/truncations ``[T]``.
    """
    _require_minari()
    from minari.data_collector import EpisodeBuffer

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    env = make_env(env_id, **(env_kwargs or {}))
    try:
        policy = _make_policy(actor_or_fn, env.action_space, deterministic, seed)
        episodes: list = []
        steps = 0
        while steps < num_steps:
            ep_seed = seed + len(episodes)
            obs, _ = env.reset(seed=ep_seed)
            observations, actions, rewards, terms, truncs = [obs], [], [], [], []
            while True:
                action = policy(obs).astype(env.action_space.dtype)
                obs, reward, terminated, truncated, _ = env.step(action)
                steps += 1
                observations.append(obs)
                actions.append(action)
                rewards.append(float(reward))
                terms.append(bool(terminated))
                truncs.append(bool(truncated) or (steps >= num_steps and not terminated))
                if terms[-1] or truncs[-1]:
                    break
            episodes.append(EpisodeBuffer(
                seed=ep_seed, observations=np.stack(observations), actions=np.stack(actions),
                rewards=np.asarray(rewards, dtype=np.float64), terminations=np.asarray(terms, dtype=bool),
                truncations=np.asarray(truncs, dtype=bool)))
    finally:
        env.close()
    return episodes


def _check_dataset_id(dataset_id: str) -> None:
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError, AttributeError) as err:  # a missing -vN makes Minari fail on int(None)
        raise InputError(f"bad Minari dataset id {dataset_id!r}: ids look like 'namespace/name-v0' "
                         f"(the -vN version is required)") from err


def _check_writable(dataset_id: str, overwrite: bool) -> None:
    _check_dataset_id(dataset_id)
    path = _local_dataset_dir(dataset_id)
    if path.exists() and not overwrite:
        raise DatasetExistsError(f"Minari dataset {dataset_id!r} already exists at {path}; pass overwrite=True "
                                 f"(--overwrite) to replace it, or use another id/version")


#: Prefix of the hidden staging folders in the Minari store (Minari's listing skips hidden folders).
_STAGING_PREFIX = ".energyflow-staging-"


@contextlib.contextmanager
def _store_root(root: str):
    """Point Minari (which reads ``MINARI_DATASETS_PATH`` on every call) at ``root`` for a while."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = root
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _remove_stale_staging(store: str) -> None:
    """Remove staging folders left by builds of this host whose process no longer exists (killed)."""
    host = socket.gethostname()
    for name in os.listdir(store):
        if not name.startswith(f"{_STAGING_PREFIX}{host}-"):
            continue
        try:
            pid = int(name[len(f"{_STAGING_PREFIX}{host}-"):].split("-", 1)[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(os.path.join(store, name), ignore_errors=True)
        except (PermissionError, OSError):  # alive (another user's) or unknowable: leave it
            pass


def _write_minari(dataset_id: str, episodes: list, env, **kwargs: Any) -> None:
    """The writing step: ``minari.create_dataset_from_buffers`` into the current store."""
    minari = _require_minari()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is set to None", category=UserWarning)
        minari.create_dataset_from_buffers(dataset_id, episodes, env=env, eval_env=env.spec, **kwargs)


def _ensure_namespace(dataset_id: str) -> None:
    """Create the dataset's namespace in the current store when it is missing (as Minari would)."""
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import create_namespace, list_local_namespaces

    namespace = parse_dataset_id(dataset_id)[0]
    if namespace is not None and namespace not in list_local_namespaces():
        create_namespace(namespace)


def create_minari_dataset(dataset_id: str, episodes: Sequence["EpisodeBuffer"], env_id: str,
                          ref_min_score: Optional[float] = None, ref_max_score: Optional[float] = None,
                          description: str = "", overwrite: bool = False, env_kwargs: Optional[dict] = None,
                          algorithm_name: str = "energyflow rollouts",
                          author: str = "energyflow") -> "MinariDataset":
    """Store episode buffers as a Minari dataset in the local store (``minari.create_dataset_from_buffers``).

    Reference scores: missing ones are taken from :data:`REF_SCORES` for ``env_id``; both or neither
    must end up known (Minari would otherwise estimate ``ref_min_score`` from 100 random episodes).
    ``env_kwargs`` (e.g. ``max_episode_steps``) are recorded in the dataset's env spec.  An existing
    ``dataset_id`` is refused (:class:`DatasetExistsError`) unless ``overwrite=True``.

    The write is all-or-nothing: the dataset is built under the same id in a hidden staging folder
    of the store (``.energyflow-staging-*``, on the same file system, invisible to Minari's
    listing), then renamed into place; an existing dataset is renamed aside first and deleted only
    once the new one is in.  Any failure (a full disk, Ctrl-C, an error in Minari) leaves the old
    dataset, or no dataset, and removes the staging folder.  While the build runs,
    ``MINARI_DATASETS_PATH`` points at the staging folder (Minari has no other way to be told where
    to write), so do not build datasets from several threads of one process at once.
    """
    minari = _require_minari()
    if len(episodes) == 0:
        raise ValueError("no episodes to store")
    _check_writable(dataset_id, overwrite)
    known_lo, known_hi = _ref_scores_or_none(env_id)
    lo = known_lo if ref_min_score is None else float(ref_min_score)
    hi = known_hi if ref_max_score is None else float(ref_max_score)
    if (lo is None) != (hi is None):
        raise ValueError(f"give both ref_min_score and ref_max_score for {env_id!r} (or neither)")
    final = _local_dataset_dir(dataset_id)
    store = str(_local_dataset_dir(None))
    _remove_stale_staging(store)
    env = make_env(env_id, **(env_kwargs or {}))  # an unknown id fails before anything is written
    try:
        staging = tempfile.mkdtemp(dir=store, prefix=f"{_STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-")
    except BaseException:
        env.close()
        raise
    built = os.path.join(staging, "store", dataset_id)
    aside = os.path.join(staging, "replaced")
    try:
        with _store_root(os.path.join(staging, "store")):
            _write_minari(dataset_id, list(episodes), env, algorithm_name=algorithm_name, author=author,
                          description=description or f"{algorithm_name} on {env_id}", ref_min_score=lo,
                          ref_max_score=hi)
        if not os.path.isdir(os.path.join(built, "data")):
            raise RuntimeError(f"Minari wrote no dataset at {built}")
        _ensure_namespace(dataset_id)
        os.makedirs(final.parent, exist_ok=True)
        if final.exists():
            if not overwrite:  # appeared while this one was being built
                raise DatasetExistsError(f"Minari dataset {dataset_id!r} appeared at {final} while this one was "
                                         f"being built; pass overwrite=True to replace it")
            os.rename(final, aside)
        os.rename(built, final)
    finally:
        try:
            if os.path.exists(aside) and not final.exists():
                os.rename(aside, final)  # the swap did not finish: put the old dataset back
        finally:
            env.close()
            shutil.rmtree(staging, ignore_errors=True)
    return minari.MinariDataset(final / "data")


#: The name that stands for a uniformly random policy in :func:`make_mixed_dataset`'s actor list.
RANDOM_ACTOR = "random"


def make_mixed_dataset(dataset_id: str, actor_paths: Sequence[str], steps_per_actor: Union[Sequence[int], int],
                       env_id: Optional[str] = None, seed: int = 0, overwrite: bool = False,
                       env_kwargs: Optional[dict] = None, deterministic: bool = False,
                       description: Optional[str] = None) -> "MinariDataset":
    """Roll out each actor checkpoint (:func:`~domains.rl.behaviour.load_actor`) and store all episodes
    as one Minari dataset: a medium-replay-like mixture when the checkpoints span a training run.

    An entry ``"random"`` (:data:`RANDOM_ACTOR`) instead of a path rolls out uniformly random
    actions: on its own it makes a D4RL-like ``random`` dataset; in a mixture it plays the part of
    a replay buffer's first, purely exploratory steps (SAC's ``learning_starts``).

    Episode seeds run consecutively from ``seed`` across actors; ``env_id`` defaults to the first
    checkpoint's.  Every checkpoint must fit the environment's spaces.
    """
    from .behaviour import load_actor

    if len(actor_paths) == 0:
        raise ValueError("no actor checkpoints given")
    steps = [int(steps_per_actor)] * len(actor_paths) if isinstance(steps_per_actor, int) else list(steps_per_actor)
    if len(steps) != len(actor_paths):
        raise ValueError(f"{len(actor_paths)} checkpoints but {len(steps)} step counts")
    loaded = [(None, {"env_id": env_id, "steps": 0, "eval_return": "random"}) if p == RANDOM_ACTOR else load_actor(p)
              for p in actor_paths]
    env_id = env_id or next((m["env_id"] for _, m in loaded if m.get("env_id")), None)
    if env_id is None:
        raise ValueError("every actor is 'random': name the environment (env_id, or --env on the command line)")
    _check_writable(dataset_id, overwrite)  # before spending time on rollouts
    probe = make_env(env_id, **(env_kwargs or {}))
    obs_dim, act_dim = int(np.prod(probe.observation_space.shape)), int(np.prod(probe.action_space.shape))
    probe.close()
    for p, (actor, meta) in zip(actor_paths, loaded):
        if actor is not None and (meta["obs_dim"], meta["act_dim"]) != (obs_dim, act_dim):
            raise InputError(f"checkpoint {p} (obs {meta['obs_dim']}, act {meta['act_dim']}, env {meta.get('env_id')}) "
                             f"does not fit {env_id} (obs {obs_dim}, act {act_dim})")
    episodes: list = []
    for (actor, _), n in zip(loaded, steps):
        episodes += rollout(actor, env_id, n, seed=seed + len(episodes), deterministic=deterministic,
                            env_kwargs=env_kwargs)
    if description is None:
        parts = [f"{os.path.basename(p)} (steps {m.get('steps', '?')}, eval return "
                 f"{m.get('eval_return', '?')}): {n} steps" for p, (_, m), n in zip(actor_paths, loaded, steps)]
        description = f"Rollouts of {len(actor_paths)} SAC checkpoints on {env_id}: " + "; ".join(parts)
    return create_minari_dataset(dataset_id, episodes, env_id, description=description, overwrite=overwrite,
                                 env_kwargs=env_kwargs,
                                 algorithm_name="SAC checkpoints (energyflow make_mixed_dataset)")


#: The arrays of a saved replay buffer (:func:`domains.rl.behaviour.save_replay_buffer`).
REPLAY_ARRAYS = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")


def load_replay_buffer(path: str) -> dict[str, np.ndarray]:
    """Read a replay buffer saved by :func:`domains.rl.behaviour.save_replay_buffer` (``.npz``,
    read with ``allow_pickle=False``: nothing in it can run code), checked.

    Raises:
        DatasetNotFoundError: no such file.
        InvalidDatasetError: not an ``.npz`` of numeric arrays, a missing key, arrays of different
            lengths or shapes, NaN/inf values, or consecutive transitions of one episode whose
            next observation is not the following observation; one line naming the file and key.
    """
    source = f"replay buffer {path}"
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{source} not found (write one with 'energyflow data train-behaviour "
                                   f"--save-replay')")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in REPLAY_ARRAYS if k not in f.files]
            if missing:
                raise InvalidDatasetError(f"{source} lacks key(s) {missing}; it has {sorted(f.files)}")
            arrays = {k: np.asarray(f[k]) for k in REPLAY_ARRAYS}
    except InvalidDatasetError:
        raise
    except (OSError, ValueError, EOFError) as err:  # not a zip, truncated, pickled objects
        raise InvalidDatasetError(f"{source} is not a readable .npz of arrays ({' '.join(str(err).split())[:200]})") from None
    n = len(arrays["observations"])
    for key, value in arrays.items():
        want = 2 if key in ("observations", "next_observations", "actions") else 1
        if value.ndim != want or len(value) != n:
            raise InvalidDatasetError(f"{source}: key {key!r} has shape {value.shape}; expected {want}-D with "
                                      f"{n} rows (as 'observations')")
    if arrays["next_observations"].shape != arrays["observations"].shape:
        raise InvalidDatasetError(f"{source}: 'next_observations' {arrays['next_observations'].shape} does not match "
                                  f"'observations' {arrays['observations'].shape}")
    if n == 0:
        raise InvalidDatasetError(f"{source} holds no transitions")
    for key in ("terminals", "timeouts"):
        if arrays[key].dtype != bool:
            raise InvalidDatasetError(f"{source}: key {key!r} must be boolean, got {arrays[key].dtype}")
    floats = {k: _as_float_array(source, k, arrays[k]) for k in ("observations", "next_observations", "actions", "rewards")}
    _check_finite(source, **floats)
    arrays.update(floats)
    ends = arrays["terminals"] | arrays["timeouts"]
    inner = ~ends[:-1]  # transition i and i + 1 belong to one episode
    gap = np.abs(arrays["next_observations"][:-1] - arrays["observations"][1:]).max(axis=1)
    broken = np.flatnonzero(inner & (gap > 1e-6))
    if len(broken):
        raise InvalidDatasetError(f"{source}: transition {int(broken[0])} continues its episode, but its next "
                                  f"observation is not transition {int(broken[0]) + 1}'s observation "
                                  f"({len(broken)} such breaks): not a buffer of consecutive transitions")
    return arrays


def replay_episodes(arrays: dict[str, np.ndarray], seed: int = 0) -> list["EpisodeBuffer"]:
    """Cut a replay buffer's transitions (:func:`load_replay_buffer`) into Minari episode buffers:
    an episode ends at a terminal or a timeout; the last one, still running when the buffer was
    saved, is marked truncated.  Episode ``i`` records ``seed + i`` (SAC's resets are not seeded
    per episode)."""
    _require_minari()
    from minari.data_collector import EpisodeBuffer

    ends = arrays["terminals"] | arrays["timeouts"]
    stops = list(np.flatnonzero(ends) + 1)
    if not stops or stops[-1] != len(ends):
        stops.append(len(ends))
    episodes, start = [], 0
    for i, stop in enumerate(stops):
        sl = slice(start, stop)
        obs = np.concatenate([arrays["observations"][sl], arrays["next_observations"][stop - 1:stop]])
        truncs = arrays["timeouts"][sl].copy()
        if not (arrays["terminals"][stop - 1] or truncs[-1]):
            truncs[-1] = True  # the episode in progress when the buffer was saved
        episodes.append(EpisodeBuffer(seed=seed + i, observations=obs, actions=arrays["actions"][sl],
                                      rewards=arrays["rewards"][sl].astype(np.float64),
                                      terminations=arrays["terminals"][sl].copy(), truncations=truncs))
        start = stop
    return episodes


def make_replay_dataset(dataset_id: str, replay_path: str, env_id: str, overwrite: bool = False,
                        description: Optional[str] = None) -> "MinariDataset":
    """A D4RL-style ``medium-replay`` dataset: the replay buffer SAC saved at a checkpoint
    (``energyflow data train-behaviour --save-replay``), every transition it collected up to that
    policy, random start included, stored as a Minari dataset of its episodes in collection order."""
    _check_writable(dataset_id, overwrite)
    arrays = load_replay_buffer(replay_path)
    probe = make_env(env_id)
    obs_dim, act_dim = int(np.prod(probe.observation_space.shape)), int(np.prod(probe.action_space.shape))
    probe.close()
    if (arrays["observations"].shape[1], arrays["actions"].shape[1]) != (obs_dim, act_dim):
        raise InputError(f"replay buffer {replay_path} (obs {arrays['observations'].shape[1]}, act "
                         f"{arrays['actions'].shape[1]}) does not fit {env_id} (obs {obs_dim}, act {act_dim})")
    episodes = replay_episodes(arrays)
    if description is None:
        description = (f"SAC replay buffer on {env_id} ({os.path.basename(replay_path)}): {len(arrays['rewards'])} "
                       f"transitions in {len(episodes)} episodes, in collection order")
    return create_minari_dataset(dataset_id, episodes, env_id, description=description, overwrite=overwrite,
                                 algorithm_name="SAC replay buffer (energyflow make_replay_dataset)")
