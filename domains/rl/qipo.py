"""QIPO: Q-weighted iterative policy optimisation (ALGORITHMS §4), as cached, resumable stages.

1. ``behaviour``: μ(a | s) by flow matching (QIPO-OT) or denoising (QIPO-Diff) on the dataset.
2. ``support``: M actions of μ for every next state (the critic's support set).
3. ``critic``: in-support softmax Q-learning with an explicit target temperature α.
4. ``rounds``: π ← μ; each round draws M actions per sampled state from the current π, weights
   them by softmax(β · Q̃) within the state's group — Q̃ is Q standardised within the group, so β
   is scale-free — and trains π on the *unclipped* actions with the grouped energy-weighted loss
   (energy = −Q̃).  After n rounds π ≈ μ·exp(n β Q̃): the guidance compounds.  Each round is
   one round of iterative EFM: :func:`energyflow.iterative.fit_tilted` on the renewed actions.

Each stage is an :class:`energyflow.stages.Stage` keyed by its configuration and its inputs' keys,
so changing β or the number of rounds retrains neither the behaviour model nor the critic.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from energyflow.data import TensorBatchSource
from energyflow.errors import CorruptFileError, InputError
from energyflow.files import append_jsonl, atomic_torch_save, load_torch, read_jsonl
from energyflow.guidance import CEPGuidedPredictor
from energyflow.iterative import fit_tilted
from energyflow.losses import ContrastiveEnergyLoss, FlowMatchingLoss, OneStepDistillationLoss
from energyflow.nets import MLPEnergyNet
from energyflow.predictor import Predictor
from energyflow.sampling import sampler_from_config
from energyflow.stages import Stage, fingerprint
from energyflow.trainer import Trainer, TrainerConfig
from energyflow.validation import check_integer, check_number

from .critic import InSupportCriticLoss, TwinQ
from .datasets import Transitions
from .policy import GenerativePolicy, load_weights, save_weights

__all__ = ["QIPOConfig", "QIPO", "ONE_STEP_SAMPLER", "standardize_within_groups", "q_energies", "frozen_q_scale", "transitions_fingerprint", "make_policy",
           "make_energy_net", "energy_meta", "guided_predictor"]

TRANSITION_ARRAYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "episode_ids")
"""The arrays of :class:`~domains.rl.datasets.Transitions` whose contents key the stages."""


@dataclass
class QIPOConfig:
    """Every QIPO hyperparameter (defaults for a CPU-scale run; see docs/qipo.md for why).

    Attributes:
        path: ``"ot"`` (QIPO-OT) or ``"vp"`` (QIPO-Diff).
        hidden, depth: policy MLP.
        behaviour: trainer settings of the behaviour model (steps, batch_size, lr, ...).
        num_support: M, support actions per state (critic and rounds).
        critic_hidden, critic_depth, gamma, alpha, critic: the critic and its trainer
            (``ema_decay`` = 1 − τ, the Polyak rate).
        critic_states: how many transitions get a support set (``None``: all).
        beta: inverse temperature on the group-standardised Q.
        rounds: number of support renewals; ``round_steps``: policy steps per round; ``round_states``:
            states sampled per renewal; ``round_trainer``: trainer settings for the rounds.
        q_scale: how Q becomes an energy in the rounds: ``"group"`` standardises Q within each
            state's M actions (every state gets a full-strength tilt); ``"frozen"`` divides the
            centred Q by one scale, the mean within-state std of Q at the first renewal, kept for
            all rounds (states whose actions differ only by critic noise get a weak tilt).
        round_time: ``"group"`` (one flow time per state's group of M actions) or ``"sample"``.
        round_optimizer: ``"fresh"`` (a new AdamW each renewal) or ``"kept"`` (one AdamW state
            carried across the rounds).
        onestep: trainer settings of the one-step policy (``algo=qipo_onestep``): the final QIPO-OT
            policy distilled into one network evaluation per action
            (:class:`~energyflow.losses.OneStepDistillationLoss`).
        qgpo: the QGPO baseline's time-dependent energy network (contrastive energy prediction on the
            critic's support set, weights softmax(β·Q̃)) and its guidance ``scale``.
        checkpoint_every: stage trainers checkpoint this often (a killed stage resumes from there).
        seed: seeds every stage.
    """

    path: str = "ot"
    hidden: int = 128
    depth: int = 3
    behaviour: dict = field(default_factory=lambda: {"steps": 20000, "batch_size": 256, "lr": 3e-4, "ema_decay": 0.999})
    num_support: int = 16
    critic_hidden: int = 256
    critic_depth: int = 2
    gamma: float = 0.99
    alpha: float = 0.1
    critic_states: Optional[int] = 50000
    critic: dict = field(default_factory=lambda: {"steps": 25000, "batch_size": 256, "lr": 3e-4, "ema_decay": 0.98})
    beta: float = 1.0
    rounds: int = 4
    round_steps: int = 1000
    round_states: int = 32000
    round_trainer: dict = field(default_factory=lambda: {"batch_size": 1024, "lr": 1e-4, "ema_decay": 0.0})
    q_scale: str = "group"
    round_time: str = "group"
    round_optimizer: str = "fresh"
    onestep: dict = field(default_factory=lambda: {"steps": 3000, "batch_size": 1024, "lr": 3e-4, "ema_decay": 0.999})
    qgpo: dict = field(default_factory=lambda: {"steps": 10000, "batch_size": 1024, "lr": 3e-4, "ema_decay": 0.999,
                                                "hidden": 128, "depth": 3, "scale": 1.0})
    checkpoint_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "qipo") -> None:
        """Check every field; a bad one raises :class:`~energyflow.errors.InputError` naming
        ``<where>.<field>`` and what is expected.  Integral floats (``4.0``) become ints."""
        for name, value in _check_settings(asdict(self), where).items():
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any], where: str = "qipo") -> "QIPOConfig":
        """Build from a recipe's dict: unknown keys and bad values raise an
        :class:`~energyflow.errors.InputError` naming the recipe key (``where`` is its prefix)."""
        if not isinstance(settings, Mapping):
            raise InputError(f"{where} must be a mapping of QIPO settings, got {type(settings).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise InputError(f"{where}: unknown setting(s) {unknown}; valid: {sorted(known)}")
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(cls)}
        checked = _check_settings({**defaults, **dict(settings)}, where)
        return cls(**checked)


_TRAINER_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainerConfig))
# round_trainer keys that QIPO sets itself (a value there would be silently replaced)
_SET_PER_ROUND = {"steps": "use round_steps", "seed": "rounds are seeded from seed", "resume": "rounds never resume"}
_QGPO_NET = ("hidden", "depth", "scale")


def _trainer_settings(value: Any, where: str, extra: Mapping[str, Any] = {}, refused: Mapping[str, str] = {}) -> dict:
    """Check a trainer dict: only :class:`TrainerConfig` keys (plus ``extra``), values as TrainerConfig
    checks them (it is built once here, so a bad value fails before any training)."""
    if not isinstance(value, Mapping):
        raise InputError(f"{where} must be a mapping of trainer settings, got {value!r}")
    value = dict(value)
    for key, why in refused.items():
        if key in value:
            raise InputError(f"{where}.{key} is set by QIPO itself ({why}); remove it")
    unknown = sorted(set(value) - _TRAINER_FIELDS - set(extra))
    if unknown:
        raise InputError(f"{where}: unknown setting(s) {unknown}; valid: {sorted(_TRAINER_FIELDS | set(extra))}")
    try:
        TrainerConfig(**{k: v for k, v in value.items() if k not in extra})
    except (ValueError, TypeError) as err:
        raise InputError(f"{where}: {err}") from None
    for key, check in extra.items():
        if key in value:
            value[key] = check(value[key], f"{where}.{key}")
    return value


def _check_settings(v: dict[str, Any], where: str) -> dict[str, Any]:
    """Checked (and normalised) copies of every :class:`QIPOConfig` field in ``v``."""
    w = lambda name: f"{where}.{name}"  # noqa: E731
    out = dict(v)
    if v["path"] not in ("ot", "vp"):
        raise InputError(f"{w('path')} must be 'ot' or 'vp', got {v['path']!r}")
    for name, choices in (("q_scale", ("group", "frozen")), ("round_time", ("group", "sample")),
                          ("round_optimizer", ("fresh", "kept"))):
        if v[name] not in choices:
            raise InputError(f"{w(name)} must be one of {list(choices)}, got {v[name]!r}")
    for name in ("hidden", "depth", "critic_hidden", "critic_depth", "round_steps", "round_states"):
        out[name] = check_integer(v[name], w(name), minimum=1)
    # standardising Q within a state's group needs a spread: at least two support actions
    out["num_support"] = check_integer(v["num_support"], w("num_support"), minimum=2)
    out["rounds"] = check_integer(v["rounds"], w("rounds"), minimum=0)
    out["checkpoint_every"] = check_integer(v["checkpoint_every"], w("checkpoint_every"), minimum=0)
    out["seed"] = check_integer(v["seed"], w("seed"))
    if v["critic_states"] is not None:
        out["critic_states"] = check_integer(v["critic_states"], w("critic_states"), minimum=1)
    out["gamma"] = check_number(v["gamma"], w("gamma"), 0.0, 1.0)
    out["alpha"] = check_number(v["alpha"], w("alpha"), 0.0)
    out["beta"] = check_number(v["beta"], w("beta"), 0.0)
    out["behaviour"] = _trainer_settings(v["behaviour"], w("behaviour"))
    out["critic"] = _trainer_settings(v["critic"], w("critic"))
    out["round_trainer"] = _trainer_settings(v["round_trainer"], w("round_trainer"), refused=_SET_PER_ROUND)
    out["onestep"] = _trainer_settings(v["onestep"], w("onestep"))
    positive = lambda x, at: check_integer(x, at, minimum=1)  # noqa: E731
    out["qgpo"] = _trainer_settings(v["qgpo"], w("qgpo"), extra={"hidden": positive, "depth": positive,
                                                              "scale": lambda x, at: check_number(x, at, 0.0)})
    m = out["num_support"]
    for name in ("round_trainer", "qgpo"):  # both losses weight whole groups of M actions per state
        batch = out[name].get("batch_size", TrainerConfig.batch_size)
        if batch % m:
            raise InputError(f"{w(name)}.batch_size ({batch}) must be a multiple of {w('num_support')} ({m}): "
                             f"the weights are a softmax within each state's {m} actions")
    return out


def transitions_fingerprint(data: Transitions) -> dict[str, str]:
    """A content hash of each array of ``data`` (:data:`TRANSITION_ARRAYS`), for the stage keys.

    Computed once per run and passed to every :class:`QIPO` of the run: a dataset replaced at the
    same path, or rebuilt under the same Minari id, gets new keys, so stale stages are never reused."""
    return {name: fingerprint(getattr(data, name)) for name in TRANSITION_ARRAYS}


#: The one-step policy's sampler: one Euler step of its field from t = 0 (see OneStepDistillationLoss).
ONE_STEP_SAMPLER = {"name": "euler", "steps": 1}


def make_policy(cfg: QIPOConfig, obs_dim: int, act_dim: int, obs_mean: Optional[Tensor] = None,
                obs_std: Optional[Tensor] = None, sampler: Optional[dict] = None) -> GenerativePolicy:
    """An untrained policy shaped as ``cfg`` says (the normalisation is part of its saved weights);
    ``sampler`` overrides the path's default (``ONE_STEP_SAMPLER`` for the one-step policy)."""
    return GenerativePolicy(obs_dim, act_dim, cfg.path, cfg.hidden, cfg.depth, obs_mean=obs_mean, obs_std=obs_std,
                            sampler=sampler)


def make_energy_net(cfg: QIPOConfig, obs_dim: int, act_dim: int) -> MLPEnergyNet:
    """QGPO's untrained time-dependent energy network f(a_t, t, s)."""
    return MLPEnergyNet(act_dim, hidden=cfg.qgpo.get("hidden", 128), depth=cfg.qgpo.get("depth", 3), cond_dim=obs_dim)


def energy_meta(obs_mean: Tensor, obs_std: Tensor, behaviour_path: Any) -> dict[str, Any]:
    """What a saved QGPO energy network needs to be used without this module: f(a_t, t, s) of noisy
    actions ``a_t`` at time ``t`` on the behaviour policy's path, conditioned on the state normalised
    by ``obs_mean`` / ``obs_std``; its gradient in ``a_t`` guides the behaviour policy."""
    spec = behaviour_path.spec() if hasattr(behaviour_path, "spec") else behaviour_path
    return {"role": "QGPO intermediate energy", "x": "noisy action a_t on the behaviour policy's path",
            "cond": "observation normalised by obs_mean/obs_std", "behaviour_path": spec,
            "guidance": "scale * grad_a f(a_t, t, s) added to the behaviour policy's field (CEP guidance)",
            "obs_mean": obs_mean.detach().clone(), "obs_std": obs_std.detach().clone()}


def guided_predictor(behaviour: GenerativePolicy, energy_net: nn.Module, cfg: QIPOConfig) -> CEPGuidedPredictor:
    """QGPO's sampler model: μ guided by ∇f at scale ``cfg.qgpo["scale"]``."""
    return CEPGuidedPredictor(behaviour.predictor(), energy_net.eval(), scale=float(cfg.qgpo.get("scale", 1.0)))


def standardize_within_groups(q: Tensor, min_std: float = 1e-3) -> Tensor:
    """``(q − mean_g) / std_g`` within each row of ``q`` [G, M] (std floored at ``min_std``)."""
    return (q - q.mean(1, keepdim=True)) / q.std(1, keepdim=True).clamp_min(min_std)


def q_energies(q: Tensor, scale: Optional[float] = None) -> Tensor:
    """The rounds' energies −Q̃ of ``q`` [G, M]: Q standardised within each row (``q_scale="group"``),
    or, given ``scale`` (``q_scale="frozen"``), Q centred within each row and divided by it."""
    return -(standardize_within_groups(q) if scale is None else (q - q.mean(1, keepdim=True)) / scale)


def frozen_q_scale(q: Tensor, min_std: float = 1e-3) -> float:
    """The ``q_scale="frozen"`` scale: the mean within-row std of ``q`` [G, M] (of the first renewal)."""
    return float(q.std(1).mean().clamp_min(min_std))


class QIPO:
    """The QIPO pipeline on a dataset, with cached stages under ``cache_dir``.

    Args:
        data: the offline transitions (raw observations; the policy and critic normalise them),
            rewards already multiplied by ``reward_scale``.
        config: a :class:`QIPOConfig` (checked again here).
        cache_dir: where stages live (share it between runs to reuse the behaviour model and critic).
        device: torch device for training.
        progress: show progress bars.
        fingerprints: :func:`transitions_fingerprint` of ``data`` when the caller already has it (one
            hash per run, not one per seed); computed here otherwise.
        reward_scale: the factor already applied to ``data.rewards``: recorded in the critic's key
            (on top of the rewards' fingerprint) so the Q scale of a cached critic is explicit.

    Stage keys hold everything that changes a stage's output: the contents of the arrays it reads,
    every setting it uses and its upstream stages' keys.  Left out on purpose: ``rounds`` (a chain,
    see :meth:`run_rounds`), ``qgpo["scale"]`` (used at sampling time only), ``checkpoint_every``
    (resume from a checkpoint is exact, so where a stage was checkpointed does not change it), and
    ``device`` / ``progress`` (where and how visibly it runs).
    """

    def __init__(self, data: Transitions, config: QIPOConfig, cache_dir: str, device: str = "auto",
                 progress: bool = True, *, fingerprints: Optional[Mapping[str, str]] = None,
                 reward_scale: float = 1.0):
        from energyflow.runtime import resolve_device

        config.validate()
        self.data, self.cfg, self.cache_dir = data, config, cache_dir
        self.device = resolve_device(device)
        self.progress = progress
        self.obs_mean, self.obs_std = data.observation_stats()
        fp = dict(fingerprints) if fingerprints is not None else transitions_fingerprint(data)
        missing = [name for name in TRANSITION_ARRAYS if name not in fp]
        if missing:
            raise ValueError(f"fingerprints lacks {missing}: pass transitions_fingerprint(data)")
        self.fingerprints = fp
        c = config
        # behaviour: μ(a | s) reads the observations (also their mean/std) and the actions only
        self.behaviour_stage = Stage("behaviour", {
            "data": {k: fp[k] for k in ("observations", "actions")}, "path": c.path, "hidden": c.hidden,
            "depth": c.depth, "trainer": c.behaviour, "seed": c.seed}, cache_dir)
        # critic: the rest of the transitions (returns-to-go in its summary read episode ids)
        self.critic_stage = Stage("critic", {
            "data": {k: fp[k] for k in ("rewards", "next_observations", "terminals", "timeouts", "episode_ids")},
            "reward_scale": float(reward_scale), "num_support": c.num_support, "hidden": c.critic_hidden,
            "depth": c.critic_depth, "gamma": c.gamma, "alpha": c.alpha, "states": c.critic_states,
            "trainer": c.critic, "seed": c.seed}, cache_dir, upstream=[self.behaviour_stage])
        # The number of rounds is not part of the key: rounds form a chain (round r depends only on
        # round r − 1 and its own seeds), so asking for fewer rounds reads a prefix of a cached run
        # and asking for more continues it.
        self.rounds_stage = Stage("rounds", {"beta": c.beta, "round_steps": c.round_steps,
                                             "round_states": c.round_states, "num_support": c.num_support,
                                             "trainer": c.round_trainer, "q_scale": c.q_scale,
                                             "round_time": c.round_time, "round_optimizer": c.round_optimizer,
                                             "seed": c.seed},
                                  cache_dir, upstream=[self.behaviour_stage, self.critic_stage])
        # QGPO's energy net: the guidance scale is applied at sampling time only, so it is not in the key
        self.qgpo_stage = Stage("qgpo_energy", {"beta": c.beta, "num_support": c.num_support,
                                                **{k: v for k, v in c.qgpo.items() if k != "scale"}, "seed": c.seed},
                                self.cache_dir, upstream=[self.behaviour_stage, self.critic_stage])

    # -- builders ------------------------------------------------------------------------------------
    def new_policy(self, sampler: Optional[dict] = None) -> GenerativePolicy:
        return make_policy(self.cfg, self.data.obs_dim, self.data.act_dim, self.obs_mean, self.obs_std,
                           sampler).to(self.device)

    def new_critic(self) -> TwinQ:
        return TwinQ(self.data.obs_dim, self.data.act_dim, self.cfg.critic_hidden, self.cfg.critic_depth).to(self.device)

    def new_energy_net(self) -> MLPEnergyNet:
        return make_energy_net(self.cfg, self.data.obs_dim, self.data.act_dim).to(self.device)

    def _trainer_config(self, settings: dict, **extra: Any) -> TrainerConfig:
        return TrainerConfig(**{"seed": self.cfg.seed, "device": str(self.device), "progress": self.progress,
                                "log_every": 200, "checkpoint_every": self.cfg.checkpoint_every, **settings, **extra})

    def _norm(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean.to(obs.device)) / self.obs_std.to(obs.device)

    def _load(self, module: nn.Module, stage: Stage, filename: str, what: str) -> nn.Module:
        """``module`` with the weights of ``stage``'s ``filename`` (one-line errors that say how to redo it)."""
        try:
            return load_weights(module, stage.file(filename), what, map_location=self.device)
        except InputError as err:
            raise type(err)(f"{err}; delete {stage.folder} to redo the {stage.name} stage") from None

    def _support(self, path: str, what: str = "critic support set") -> tuple[Tensor, Tensor]:
        """The ``support`` [N, M, act_dim] and ``index`` [N] saved by the critic stage, checked."""
        redo = f"delete {os.path.dirname(path)} to redo the critic stage"
        try:
            saved = load_torch(path, what=what)
        except InputError as err:
            raise type(err)(f"{err}; {redo}") from None
        ok = isinstance(saved, dict) and isinstance(saved.get("support"), Tensor) and isinstance(saved.get("index"), Tensor)
        if ok:
            support, idx = saved["support"], saved["index"]
            ok = (support.dim() == 3 and support.shape[1:] == (self.cfg.num_support, self.data.act_dim)
                  and idx.shape == (support.shape[0],) and (len(idx) == 0 or int(idx.max()) < len(self.data)))
        if not ok:
            raise CorruptFileError(f"{what} {path} is not a support set of this stage (expected 'support' "
                                   f"[N, {self.cfg.num_support}, {self.data.act_dim}] and 'index' [N]); {redo}")
        return saved["support"], saved["index"]

    # -- stage 1: behaviour --------------------------------------------------------------------------
    def behaviour(self) -> GenerativePolicy:
        """The behaviour policy μ (trained once per dataset and configuration)."""
        def train(out_dir: str) -> dict:
            torch.manual_seed(self.cfg.seed)
            policy = self.new_policy()
            d = self.data
            source = TensorBatchSource({"x1": d.actions, "cond": self._norm(d.observations)})
            trainer = Trainer(policy, FlowMatchingLoss(policy.path), source, self._trainer_config(self.cfg.behaviour),
                              out_dir=out_dir, name="behaviour")
            result = trainer.fit()
            policy.load_state_dict(trainer.ema_module.state_dict())
            save_weights(policy, os.path.join(out_dir, "policy.pt"), {"qipo_round": 0})  # μ is round 0
            return {"final": result.metrics}

        self.behaviour_stage.run(train)
        return self._load(self.new_policy(), self.behaviour_stage, "policy.pt", "behaviour policy").eval()

    # -- stage 2 + 3: support set and critic -----------------------------------------------------------
    def critic(self, behaviour: Optional[GenerativePolicy] = None) -> TwinQ:
        """The twin critic trained by in-support softmax Q-learning."""
        def train(out_dir: str) -> dict:
            mu = behaviour or self.behaviour()
            d = self.data
            n = len(d) if self.cfg.critic_states is None else min(len(d), self.cfg.critic_states)
            g = torch.Generator().manual_seed(self.cfg.seed)
            idx = torch.randperm(len(d), generator=g)[:n]
            support_path = os.path.join(out_dir, "support.pt")
            if os.path.exists(support_path):  # resuming a killed critic stage: the support set is kept
                support, _ = self._support(support_path)
            else:
                support = self.sample_in_chunks(mu, d.next_observations[idx].to(self.device), self.cfg.num_support, g)
                support = mu.clip(support).cpu()
                atomic_torch_save({"support": support, "index": idx}, support_path)
            source = TensorBatchSource({
                "x1": mu.clip(d.actions[idx]), "obs": self._norm(d.observations[idx]),
                "next_obs": self._norm(d.next_observations[idx]), "reward": d.rewards[idx],
                "terminal": d.terminals[idx], "support": support})
            torch.manual_seed(self.cfg.seed)
            critic = self.new_critic()
            objective = InSupportCriticLoss(self.cfg.gamma, self.cfg.alpha)
            trainer = Trainer(critic, objective, source, self._trainer_config(self.cfg.critic, grad_clip=None),
                              out_dir=out_dir, name="critic")
            result = trainer.fit()
            save_weights(critic, os.path.join(out_dir, "critic.pt"), {"obs_mean": self.obs_mean, "obs_std": self.obs_std})
            rtg = d.returns_to_go(self.cfg.gamma)[idx].mean()
            return {"final": result.metrics, "dataset_return_to_go_mean": float(rtg)}

        self.critic_stage.run(train)
        return self._load(self.new_critic(), self.critic_stage, "critic.pt", "critic").eval()

    @staticmethod
    def sample_in_chunks(policy: GenerativePolicy, obs: Tensor, num: int, generator: torch.Generator,
                         chunk: int = 8192) -> Tensor:
        """``policy.sample`` on many states, ``chunk`` states at a time: ``[N, num, act_dim]``."""
        return torch.cat([policy.sample(obs[i:i + chunk], num, generator) for i in range(0, obs.shape[0], chunk)])

    # -- stage 4: the QIPO rounds ----------------------------------------------------------------------
    def round_batch(self, policy: GenerativePolicy, critic: TwinQ, generator: torch.Generator,
                    scale: Optional[float] = None) -> dict[str, Tensor]:
        """One support renewal: states, M unclipped actions each from π, and energies −Q̃ ``[S, M]``:
        Q standardised within each state's group, or (``scale`` given, ``q_scale="frozen"``) Q
        centred within the group and divided by ``scale``."""
        d, m = self.data, self.cfg.num_support
        idx = torch.randint(len(d), (min(self.cfg.round_states, len(d)),), generator=generator)
        obs = d.observations[idx].to(self.device)
        actions = self.sample_in_chunks(policy, obs, m, generator)  # unclipped: what π is trained on
        obs_n = self._norm(obs)
        with torch.no_grad():
            q = critic.min_q_groups(obs_n, policy.clip(actions))
        return {"x1": actions.cpu(), "cond": obs_n.unsqueeze(1).expand(-1, m, -1).cpu(),
                "energy": q_energies(q, scale).cpu(), "q": q.cpu()}

    def _round_records(self, log_path: str) -> list[dict]:
        """The records of ``rounds.jsonl``, checked to be rounds 0, 1, 2, … in order."""
        if not os.path.exists(log_path):
            return []
        records = read_jsonl(log_path, what="QIPO rounds log")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or rec.get("round") != i:
                raise CorruptFileError(f"QIPO rounds log {log_path} line {i + 1} should be the record of round {i}, "
                                       f"got {str(rec)[:80]}; delete {os.path.dirname(log_path)} to redo the rounds")
        return records

    def run_rounds(self, evaluate: Optional[Callable[[GenerativePolicy, int], dict]] = None) -> list[dict]:
        """Run (or resume) the rounds; ``evaluate(policy, round)`` is called after each renewal
        (round 0 = the behaviour policy) and its metrics are stored in ``rounds.jsonl``.

        Returns the records of rounds ``0..rounds``: when the cache holds a longer run, its prefix
        (the policy of round ``rounds`` is the result); when it holds a shorter one, it is continued.

        Round ``r``'s policy is saved (atomically, a self-describing model file, see
        :func:`~domains.rl.policy.save_weights`) as ``round<r>/policy.pt`` *before* its record is
        appended, so a run killed anywhere resumes from the last recorded round.  The stage's lock is
        held while the chain is read and extended: runs sharing a cache never train a round twice
        (a second run waits, then reads the first one's rounds)."""
        mu = self.behaviour()
        critic = self.critic(mu)
        stage = self.rounds_stage
        with stage.lock():
            log_path = stage.file("rounds.jsonl")
            all_rounds = self._round_records(log_path)
            records = all_rounds[:self.cfg.rounds + 1]  # a cached longer run: its prefix
            policy = mu
            if records:
                last = records[-1]["round"]
                if last > 0:
                    self._load(policy, stage, f"round{last}/policy.pt", f"policy of QIPO round {last}")
            else:
                records.append({"round": 0, **(evaluate(policy, 0) if evaluate is not None else {})})
                append_jsonl(log_path, records[-1])
            g = torch.Generator()
            for r in range(records[-1]["round"] + 1, self.cfg.rounds + 1):
                start = time.perf_counter()
                g.manual_seed(self.cfg.seed + 7919 * r)
                scale = records[1]["q_scale"] if self.cfg.q_scale == "frozen" and r > 1 else None
                batch = self.round_batch(policy.eval(), critic, g, scale)
                if self.cfg.q_scale == "frozen" and r == 1:  # measured on the first renewal's support
                    scale = frozen_q_scale(batch["q"])
                    batch["energy"] = q_energies(batch["q"], scale)
                round_dir = stage.file(f"round{r}")
                state = None
                if self.cfg.round_optimizer == "kept" and r > 1:
                    state = self._optimizer_state(stage.file(f"round{r - 1}/optimizer.pt"))
                # one round of iterative EFM (energyflow.iterative.fit_tilted): pi_r ∝ pi_{r-1}·exp(β Q̃)
                # within each state's group, trained in place (no EMA: ema_decay 0 in round_trainer)
                m = self.cfg.num_support
                fit, result = fit_tilted(policy, policy.path, batch["x1"].flatten(0, 1), batch["energy"].flatten(),
                                       self.cfg.beta,
                                       self._trainer_config(self.cfg.round_trainer, steps=self.cfg.round_steps,
                                                            seed=self.cfg.seed + r, resume=False),
                                       cond=batch["cond"].flatten(0, 1), group_size=m, out_dir=round_dir, name="qipo",
                                       group_time=self.cfg.round_time == "group", optimizer_state=state)
                save_weights(policy, os.path.join(round_dir, "policy.pt"), {"qipo_round": r})
                if self.cfg.round_optimizer == "kept":
                    atomic_torch_save(fit.optimizer.state_dict(), os.path.join(round_dir, "optimizer.pt"))
                record = {"round": r, "q_support_mean": float(batch["q"].mean()), "q_scale": scale,
                          "ess_fraction": result.metrics.get("qipo/ess_fraction"), "loss": result.metrics.get("qipo/loss"),
                          "train_seconds": round(time.perf_counter() - start, 2)}
                if evaluate is not None:
                    record.update(evaluate(policy.eval(), r))
                records.append(record)
                append_jsonl(log_path, record)
            chain = records if len(records) > len(all_rounds) else all_rounds
            stage.finish({"rounds": len(chain) - 1,  # the renewals' compute time (sampling and training)
                          "seconds": round(sum(rec.get("train_seconds", 0.0) for rec in chain), 2)})
        return records

    def _optimizer_state(self, path: str) -> dict:
        redo = f"delete {self.rounds_stage.folder} to redo the rounds"
        try:
            state = load_torch(path, what="QIPO round optimizer state")
        except InputError as err:
            raise type(err)(f"{err}; {redo}") from None
        if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
            raise CorruptFileError(f"QIPO round optimizer state {path} is not an optimizer state dict; {redo}")
        return state

    def final_policy_file(self, records: list[dict]) -> str:
        """The weights file of the last of ``records`` (``run_rounds``' result): a round's policy, or μ's."""
        last = records[-1]["round"] if records else 0
        return self.rounds_stage.file(f"round{last}/policy.pt") if last > 0 else self.behaviour_stage.file("policy.pt")

    # -- the one-step policy ---------------------------------------------------------------------------
    def onestep_stage(self, teacher_round: int) -> Stage:
        """The stage of the one-step policy distilled from round ``teacher_round``'s policy."""
        return Stage("onestep", {"teacher_round": int(teacher_round), "trainer": self.cfg.onestep, "seed": self.cfg.seed},
                     self.cache_dir, upstream=[self.behaviour_stage, self.critic_stage, self.rounds_stage])

    def onestep(self, records: list[dict]) -> GenerativePolicy:
        """The final policy of ``records`` (``run_rounds``' result) distilled into a policy that acts
        in one network evaluation (``algo=qipo_onestep``): a flow-map regression onto the teacher's
        own sampler (:class:`~energyflow.losses.OneStepDistillationLoss`), from the teacher's
        weights, on the dataset's states; the student samples with :data:`ONE_STEP_SAMPLER`."""
        if self.cfg.path != "ot":
            raise InputError("the one-step policy distils a QIPO-OT policy (path 'ot')")
        teacher_round = records[-1]["round"] if records else 0
        stage = self.onestep_stage(teacher_round)
        teacher_file = self.final_policy_file(records)

        def train(out_dir: str) -> dict:
            teacher = load_weights(self.new_policy(), teacher_file, f"policy of QIPO round {teacher_round}",
                                   map_location=self.device).eval()
            smp = sampler_from_config(teacher.sampler_cfg)

            def flow_map(x0: Tensor, cond: Tensor) -> Tensor:
                bound = Predictor(teacher.net.bind(cond, 1), teacher.path, x1_clip=teacher.x1_clip)
                return smp.sample(bound, x0, None).x

            torch.manual_seed(self.cfg.seed)
            student = self.new_policy(sampler=ONE_STEP_SAMPLER)
            student.load_state_dict(teacher.state_dict())
            d = self.data
            source = TensorBatchSource({"x1": d.actions, "cond": self._norm(d.observations)})
            trainer = Trainer(student, OneStepDistillationLoss(flow_map), source,
                              self._trainer_config(self.cfg.onestep), out_dir=out_dir, name="onestep")
            result = trainer.fit()
            student.load_state_dict(trainer.ema_module.state_dict())
            save_weights(student, os.path.join(out_dir, "policy.pt"), {"distilled_from_round": teacher_round})
            return {"final": result.metrics}

        stage.run(train)
        student = self.new_policy(sampler=ONE_STEP_SAMPLER)
        return self._load(student, stage, "policy.pt", "one-step policy").eval()

    # -- the QGPO baseline --------------------------------------------------------------------------
    def qgpo_predictor(self, behaviour: Optional[GenerativePolicy] = None) -> CEPGuidedPredictor:
        """QGPO: μ guided by ∇f, with f trained by contrastive energy prediction on μ's support actions
        weighted by softmax(β·Q̃) (the same weights QIPO uses): a gradient per sampling step."""
        mu = behaviour or self.behaviour()
        critic = self.critic(mu)
        q = self.cfg.qgpo

        def train(out_dir: str) -> dict:
            support, idx = self._support(self.critic_stage.file("support.pt"))  # clipped μ actions at dataset states
            n = support.shape[0]
            obs_n = self._norm(self.data.next_observations[idx])
            m = self.cfg.num_support
            with torch.no_grad():
                qv = torch.cat([critic.min_q_groups(obs_n[i:i + 4096].to(self.device), support[i:i + 4096].to(self.device)).cpu()
                                for i in range(0, n, 4096)])
            source = TensorBatchSource({"x1": support, "cond": obs_n.unsqueeze(1).expand(-1, m, -1),
                                        "energy": q_energies(qv)}, group_size=m)
            torch.manual_seed(self.cfg.seed)
            net = self.new_energy_net()
            objective = ContrastiveEnergyLoss(mu.path, self.cfg.beta, m)
            settings = {k: v for k, v in q.items() if k not in _QGPO_NET}
            trainer = Trainer(net, objective, source, self._trainer_config(settings), out_dir=out_dir, name="qgpo")
            result = trainer.fit()
            net.load_state_dict(trainer.ema_module.state_dict())
            save_weights(net, os.path.join(out_dir, "energy.pt"), energy_meta(self.obs_mean, self.obs_std, mu.path))
            return {"final": result.metrics}

        self.qgpo_stage.run(train)
        net = self._load(self.new_energy_net(), self.qgpo_stage, "energy.pt", "QGPO energy network")
        return guided_predictor(mu, net, self.cfg)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
