"""State-conditioned generative policies: a flow (OT path) or diffusion (VP path) model of a | s.

The network is :class:`energyflow.nets.MLPField` with ``cond = normalised state``; sampling uses the
engine's samplers, so the policy samples *unclipped* actions (what QIPO trains on, see
ALGORITHMS §7) and clips only when acting in the environment or querying the critic.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from energyflow.errors import CorruptFileError
from energyflow.files import atomic_torch_save, load_torch
from energyflow.models import MODEL_FORMAT, model_record
from energyflow.nets import MLPField
from energyflow.paths import build_path
from energyflow.predictor import Predictor
from energyflow.priors import GaussianPrior
from energyflow.sampling import sampler_from_config

__all__ = ["GenerativePolicy", "load_weights", "save_weights", "record_of", "check_record"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


def check_record(record: Mapping[str, Any], net: nn.Module) -> None:
    """Check that ``record`` (:func:`energyflow.models.model_record`) holds a network like ``net``:
    the same registered class, the same constructor arguments and a state dict of tensors.

    Raises:
        ValueError: what differs, in one line (the caller names the file).
    """
    if not isinstance(record, Mapping) or record.get("format") != MODEL_FORMAT:
        raise ValueError(f"not an {MODEL_FORMAT} record")
    name, want = record.get("class"), getattr(net, "registered_name", type(net).__name__)
    if name != want:
        raise ValueError(f"it holds a {name}, not a {want}")
    init, have = record.get("init"), getattr(net, "init_kwargs", {})
    if not isinstance(init, Mapping):
        raise ValueError("its constructor arguments ('init') are not a mapping")
    differ = sorted(k for k in set(init) | set(have) if not _same(init.get(k), have.get(k)))
    if differ:
        stored = ", ".join(f"{k}={init.get(k)!r}" for k in differ)
        configured = ", ".join(f"{k}={have.get(k)!r}" for k in differ)
        raise ValueError(f"it holds a {name} with {stored}; the configured one has {configured}")
    state = record.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("its 'state_dict' is not a mapping of tensors")


def record_of(module: nn.Module, meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The self-describing record of ``module``: ``module.to_record(meta)`` for the RL modules
    (:class:`GenerativePolicy`, :class:`~domains.rl.critic.TwinQ`), otherwise the record of a
    registered core network (:func:`energyflow.models.model_record`) with ``meta``."""
    if hasattr(module, "to_record"):
        return module.to_record(meta)
    return model_record(module, meta=meta)


def save_weights(module: nn.Module, file: str | os.PathLike, meta: Optional[dict[str, Any]] = None) -> str:
    """Write ``module`` as a self-describing model file (:func:`record_of`), atomically: a crash
    leaves the old file or the new one.  :func:`energyflow.models.load_model` rebuilds its network
    without importing ``domains``; :func:`load_weights` loads it back into a configured module.
    Returns the file's path."""
    atomic_torch_save(record_of(module, meta), file)
    return os.fspath(file)


def load_weights(module: nn.Module, path: str | os.PathLike, what: str, map_location: Any = "cpu") -> nn.Module:
    """Load a model file written by :func:`save_weights` into the configured ``module``:
    ``module.load_record(record)``, or for a core network its ``state_dict`` once the stored class
    and constructor arguments are checked to be the module's.

    The file is read with ``weights_only=True`` (:func:`energyflow.files.load_torch`): a pickle that
    would need code to load is refused and nothing in it runs.

    Raises:
        InputError: ``path`` is missing.
        CorruptFileError: empty, truncated, not a model file (a plain state dict included), or the
            record of another network (another class, other sizes); one line naming ``what`` and ``path``.
        UnsafeFileError: the file holds Python objects beyond tensors and containers.
    """
    source = os.fspath(path)
    record = load_torch(source, what=what, map_location=map_location)
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        have = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CorruptFileError(f"{what} {source} is not a self-describing model file (format {have!r}; expected "
                               f"{MODEL_FORMAT!r})")
    try:
        if hasattr(module, "load_record"):
            module.load_record(record)
        else:
            check_record(record, module)
            module.load_state_dict(record["state_dict"])
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:300]
        raise CorruptFileError(f"{what} {source} does not fit the configured network ({reason})") from None
    return module


class GenerativePolicy(nn.Module):
    """π(a | s) as a conditional flow (``path="ot"``) or diffusion (``path="vp"``) model.

    Args:
        obs_dim, act_dim: sizes.
        path: ``"ot"`` (QIPO-OT) or ``"vp"`` (QIPO-Diff).
        hidden, depth: the MLP.
        sampler: ``{"name": ..., "steps": ...}`` used by :meth:`sample` (default Euler, 10 steps for OT;
            DPM-Solver, 15 steps for VP).
        action_low, action_high: the action box (used by :meth:`act` to clip).
        obs_mean, obs_std: observation normalisation (the network sees normalised states).
        x1_clip: bound on the predicted clean action x̂1 while sampling (see
            :class:`~energyflow.predictor.Predictor`): loose (3× the action box by default) so the
            samples QIPO trains on stay unclipped in the box's neighbourhood, but a VP model's rare
            far outliers (ε̂ errors amplified by 1/α near t = 0) cannot occur.
    """

    def __init__(self, obs_dim: int, act_dim: int, path: str = "ot", hidden: int = 256, depth: int = 3,
                 sampler: Optional[dict] = None, action_low: float = -1.0, action_high: float = 1.0,
                 obs_mean: Optional[Tensor] = None, obs_std: Optional[Tensor] = None,
                 x1_clip: Optional[float] = 3.0):
        super().__init__()
        self.x1_clip = None if x1_clip is None else float(x1_clip) * max(abs(float(action_low)), abs(float(action_high)))
        self.obs_dim, self.act_dim, self.path_name = obs_dim, act_dim, path
        self.net = MLPField(act_dim, hidden=hidden, depth=depth, cond_dim=obs_dim)
        self.path = build_path(path)
        default = {"name": "euler", "steps": 10} if path == "ot" else {"name": "dpm", "steps": 15}
        self.sampler_cfg = {**default, **(sampler or {})}
        self.action_low, self.action_high = float(action_low), float(action_high)
        self.register_buffer("obs_mean", torch.zeros(obs_dim) if obs_mean is None else torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.ones(obs_dim) if obs_std is None else torch.as_tensor(obs_std, dtype=torch.float32))

    def normalize(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The network on actions ``x`` [B, act_dim] at times ``t`` [B] given *normalised* states."""
        return self.net(x, t, cond)

    def predictor(self) -> Predictor:
        return Predictor(self, self.path, x1_clip=self.x1_clip)

    @torch.no_grad()
    def sample(self, obs: Tensor, num: int = 1, generator: Optional[torch.Generator] = None,
               sampler: Optional[dict] = None, predictor: Optional[Predictor] = None) -> Tensor:
        """Unclipped actions ``[B, num, act_dim]`` for raw states ``obs`` [B, obs_dim] (one batched solve).

        ``predictor`` replaces the policy's own (e.g. a gradient-guided one for QGPO)."""
        smp = sampler_from_config(self.sampler_cfg, sampler)
        # the noise of the prior the policy was trained from (drawn where the generator lives)
        x0 = GaussianPrior().sample((obs.shape[0] * num, self.act_dim), generator=generator).to(obs.device)
        if predictor is None:
            # the state's embedding and its projections are computed once per state, not per sample
            # and solver step (MLPField.bind): the same field, a third less work at M = 16
            bound = Predictor(self.net.bind(self.normalize(obs), num), self.path, x1_clip=self.x1_clip)
            return smp.sample(bound, x0, None).x.view(obs.shape[0], num, self.act_dim)
        cond = self.normalize(obs).repeat_interleave(num, dim=0)
        return smp.sample(predictor, x0, cond).x.view(obs.shape[0], num, self.act_dim)

    def clip(self, actions: Tensor) -> Tensor:
        return actions.clamp(self.action_low, self.action_high)

    @torch.no_grad()
    def act(self, obs: Tensor, generator: Optional[torch.Generator] = None,
            predictor: Optional[Predictor] = None, sampler: Optional[dict] = None) -> Tensor:
        """Clipped actions ``[B, act_dim]`` to execute (``sampler`` overrides the policy's, e.g. fewer steps)."""
        return self.clip(self.sample(obs, 1, generator, sampler=sampler, predictor=predictor)[:, 0])

    def config(self) -> dict[str, Any]:
        return {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "path": self.path_name,
                "hidden": self.net.inp.out_features, "depth": len(self.net.blocks), "sampler": self.sampler_cfg,
                "action_low": self.action_low, "action_high": self.action_high}

    def to_record(self, meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The self-describing model record of the policy's network (:class:`~energyflow.nets.MLPField`
        of actions, conditioned on the normalised observation), on its path, with everything needed
        to act without this class in ``meta``: the observation normalisation, the action box, the
        sampler and the bound on x̂1 (``x1_clip``, absolute; ``None``: unbounded).  ``meta`` is merged in."""
        info = {"role": "policy", "cond": "observation normalised by obs_mean/obs_std",
                "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "obs_mean": self.obs_mean.detach().clone(), "obs_std": self.obs_std.detach().clone(),
                "action_low": self.action_low, "action_high": self.action_high,
                "actions": "sampled unclipped; clip to [action_low, action_high] to act",
                "sampler": dict(self.sampler_cfg), "x1_clip": self.x1_clip, **(meta or {})}
        return model_record(self.net, path=self.path, sample_shape=(self.act_dim,), meta=info)

    def load_record(self, record: Mapping[str, Any]) -> None:
        """Load the network's weights and the observation normalisation from a record written by
        :meth:`to_record` (the sampler and action box stay as configured).

        Raises:
            ValueError: the record holds another network (another class or sizes, another path) or
                lacks the normalisation.
        """
        check_record(record, self.net)
        spec = record.get("path")
        if spec != self.path.spec():
            raise ValueError(f"it is a model on the path {spec}, this policy's path is {self.path.spec()}")
        meta = record.get("meta") or {}
        stats = {name: meta.get(name) for name in ("obs_mean", "obs_std")}
        for name, value in stats.items():
            if not isinstance(value, Tensor) or value.shape != (self.obs_dim,):
                raise ValueError(f"its meta has no {name} tensor of shape ({self.obs_dim},)")
        self.net.load_state_dict(record["state_dict"])
        with torch.no_grad():
            self.obs_mean.copy_(stats["obs_mean"])
            self.obs_std.copy_(stats["obs_std"])
