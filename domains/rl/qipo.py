"""QIPO: Q-weighted iterative policy optimisation (ALGORITHMS §4), as cached, resumable stages.

1. ``behaviour``: μ(a | s) by flow matching (QIPO-OT) or denoising (QIPO-Diff) on the dataset.
2. ``support``: M actions of μ for every next state (the critic's support set).
3. ``critic``: in-support softmax Q-learning with an explicit target temperature α.
4. ``rounds``: π ← μ; each round draws M actions per sampled state from the current π, weights
   them by softmax(β · Q̃) within the state's group — Q̃ is Q standardised within the group, so β
   is scale-free — and trains π on the *unclipped* actions with the grouped energy-weighted loss
   (energy = −Q̃).  After n rounds π ≈ μ·exp(n β Q̃): the guidance compounds.

Each stage is an :class:`energyflow.stages.Stage` keyed by its configuration and its inputs' keys,
so changing β or the number of rounds retrains neither the behaviour model nor the critic.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from energyflow.data import TensorBatchSource
from energyflow.guidance import CEPGuidedPredictor
from energyflow.losses import ContrastiveEnergyLoss, EnergyWeightedLoss, FlowMatchingLoss
from energyflow.nets import MLPEnergyNet
from energyflow.stages import Stage
from energyflow.trainer import Trainer, TrainerConfig

from .critic import InSupportCriticLoss, TwinQ
from .datasets import Transitions
from .policy import GenerativePolicy

__all__ = ["QIPOConfig", "QIPO", "standardize_within_groups"]


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
    critic: dict = field(default_factory=lambda: {"steps": 25000, "batch_size": 256, "lr": 3e-4, "ema_decay": 0.995})
    beta: float = 1.0
    rounds: int = 4
    round_steps: int = 1000
    round_states: int = 32000
    round_trainer: dict = field(default_factory=lambda: {"batch_size": 1024, "lr": 1e-4, "ema_decay": 0.0})
    qgpo: dict = field(default_factory=lambda: {"steps": 10000, "batch_size": 1024, "lr": 3e-4, "ema_decay": 0.999,
                                                "hidden": 128, "depth": 3, "scale": 1.0})
    checkpoint_every: int = 1000
    seed: int = 0


def standardize_within_groups(q: Tensor, min_std: float = 1e-3) -> Tensor:
    """``(q − mean_g) / std_g`` within each row of ``q`` [G, M] (std floored at ``min_std``)."""
    return (q - q.mean(1, keepdim=True)) / q.std(1, keepdim=True).clamp_min(min_std)


class QIPO:
    """The QIPO pipeline on a dataset, with cached stages under ``cache_dir``.

    Args:
        data: the offline transitions (raw observations; the policy and critic normalise them).
        config: a :class:`QIPOConfig`.
        cache_dir: where stages live (share it between runs to reuse the behaviour model and critic).
        dataset_key: identifies the dataset in the stage keys (e.g. its Minari id).
        device: torch device for training.
        progress: show progress bars.
    """

    def __init__(self, data: Transitions, config: QIPOConfig, cache_dir: str, dataset_key: str,
                 device: str = "auto", progress: bool = True):
        from energyflow.runtime import resolve_device

        self.data, self.cfg, self.cache_dir = data, config, cache_dir
        self.device = resolve_device(device)
        self.progress = progress
        self.obs_mean, self.obs_std = data.observation_stats()
        c = config
        self.behaviour_stage = Stage("behaviour", {"dataset": dataset_key, "path": c.path, "hidden": c.hidden,
                                                  "depth": c.depth, "trainer": c.behaviour, "seed": c.seed}, cache_dir)
        self.critic_stage = Stage("critic", {"num_support": c.num_support, "hidden": c.critic_hidden,
                                             "depth": c.critic_depth, "gamma": c.gamma, "alpha": c.alpha,
                                             "states": c.critic_states, "trainer": c.critic, "seed": c.seed},
                                  cache_dir, upstream=[self.behaviour_stage])
        # The number of rounds is not part of the key: rounds form a chain (round r depends only on
        # round r − 1 and its own seeds), so asking for fewer rounds reads a prefix of a cached run
        # and asking for more continues it.
        self.rounds_stage = Stage("rounds", {"beta": c.beta, "round_steps": c.round_steps,
                                             "round_states": c.round_states, "num_support": c.num_support,
                                             "trainer": c.round_trainer, "seed": c.seed},
                                  cache_dir, upstream=[self.behaviour_stage, self.critic_stage])

    # -- builders ------------------------------------------------------------------------------------
    def new_policy(self) -> GenerativePolicy:
        return GenerativePolicy(self.data.obs_dim, self.data.act_dim, self.cfg.path, self.cfg.hidden, self.cfg.depth,
                                obs_mean=self.obs_mean, obs_std=self.obs_std).to(self.device)

    def new_critic(self) -> TwinQ:
        return TwinQ(self.data.obs_dim, self.data.act_dim, self.cfg.critic_hidden, self.cfg.critic_depth).to(self.device)

    def _trainer_config(self, settings: dict, **extra: Any) -> TrainerConfig:
        return TrainerConfig(**{"seed": self.cfg.seed, "device": str(self.device), "progress": self.progress,
                                "log_every": 200, "checkpoint_every": self.cfg.checkpoint_every, **settings, **extra})

    def _norm(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean.to(obs.device)) / self.obs_std.to(obs.device)

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
            torch.save(policy.state_dict(), os.path.join(out_dir, "policy.pt"))
            return {"final": result.metrics}

        self.behaviour_stage.run(train)
        policy = self.new_policy()
        policy.load_state_dict(torch.load(self.behaviour_stage.file("policy.pt"), map_location=self.device))
        return policy.eval()

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
                support = torch.load(support_path)["support"]
            else:
                support = self.sample_in_chunks(mu, d.next_observations[idx].to(self.device), self.cfg.num_support, g)
                support = mu.clip(support).cpu()
                torch.save({"support": support, "index": idx}, support_path)
            source = TensorBatchSource({
                "x1": mu.clip(d.actions[idx]), "obs": self._norm(d.observations[idx]),
                "next_obs": self._norm(d.next_observations[idx]), "reward": d.rewards[idx],
                "terminal": d.terminals[idx], "support": support})
            torch.manual_seed(self.cfg.seed)
            critic = self.new_critic()
            objective = InSupportCriticLoss(self.cfg.gamma, self.cfg.alpha)
            trainer = Trainer(critic, objective, source, self._trainer_config(self.cfg.critic, grad_clip=None),
                              out_dir=out_dir, name="critic")
            objective.target = trainer.ema_module
            result = trainer.fit()
            torch.save(critic.state_dict(), os.path.join(out_dir, "critic.pt"))
            rtg = d.returns_to_go(self.cfg.gamma)[idx].mean()
            return {"final": result.metrics, "dataset_return_to_go_mean": float(rtg)}

        self.critic_stage.run(train)
        critic = self.new_critic()
        critic.load_state_dict(torch.load(self.critic_stage.file("critic.pt"), map_location=self.device))
        return critic.eval()

    @staticmethod
    def sample_in_chunks(policy: GenerativePolicy, obs: Tensor, num: int, generator: torch.Generator,
                         chunk: int = 8192) -> Tensor:
        """``policy.sample`` on many states, ``chunk`` states at a time: ``[N, num, act_dim]``."""
        return torch.cat([policy.sample(obs[i:i + chunk], num, generator) for i in range(0, obs.shape[0], chunk)])

    # -- stage 4: the QIPO rounds ----------------------------------------------------------------------
    def round_batch(self, policy: GenerativePolicy, critic: TwinQ, generator: torch.Generator) -> dict[str, Tensor]:
        """One support renewal: states, M unclipped actions each from π, and energies −Q̃ ``[S, M]``."""
        d, m = self.data, self.cfg.num_support
        idx = torch.randint(len(d), (min(self.cfg.round_states, len(d)),), generator=generator)
        obs = d.observations[idx].to(self.device)
        actions = self.sample_in_chunks(policy, obs, m, generator)  # unclipped: what π is trained on
        obs_n = self._norm(obs)
        with torch.no_grad():
            q = critic.min_q_groups(obs_n, policy.clip(actions))
        return {"x1": actions.cpu(), "cond": obs_n.unsqueeze(1).expand(-1, m, -1).cpu(),
                "energy": (-standardize_within_groups(q)).cpu(), "q": q.cpu()}

    def run_rounds(self, evaluate: Optional[Callable[[GenerativePolicy, int], dict]] = None) -> list[dict]:
        """Run (or resume) the rounds; ``evaluate(policy, round)`` is called after each renewal
        (round 0 = the behaviour policy) and its metrics are stored in ``rounds.jsonl``.

        Returns the records of rounds ``0..rounds``: when the cache holds a longer run, its prefix
        (the policy of round ``rounds`` is the result); when it holds a shorter one, it is continued.

        Round ``r``'s weights are saved as ``round<r>/policy.pt`` *before* its record is appended,
        so a run killed anywhere resumes from the last recorded round."""
        mu = self.behaviour()
        critic = self.critic(mu)
        stage = self.rounds_stage
        log_path = stage.file("rounds.jsonl")
        records: list[dict] = []
        if os.path.exists(log_path):
            with open(log_path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        all_rounds = records
        records = [rec for rec in records if rec["round"] <= self.cfg.rounds]  # a cached longer run: its prefix
        policy = mu
        if records:
            last = records[-1]["round"]
            if last > 0:
                policy.load_state_dict(torch.load(stage.file(f"round{last}/policy.pt"), map_location=self.device))
        else:
            records.append({"round": 0, **(evaluate(policy, 0) if evaluate is not None else {})})
            self._append(log_path, records[-1])
        g = torch.Generator()
        for r in range(records[-1]["round"] + 1, self.cfg.rounds + 1):
            g.manual_seed(self.cfg.seed + 7919 * r)
            batch = self.round_batch(policy.eval(), critic, g)
            source = TensorBatchSource({k: batch[k] for k in ("x1", "cond", "energy")}, group_size=self.cfg.num_support)
            objective = EnergyWeightedLoss(policy.path, self.cfg.beta, group_size=self.cfg.num_support)
            round_dir = stage.file(f"round{r}")
            trainer = Trainer(policy.train(), objective, source,
                              self._trainer_config(self.cfg.round_trainer, steps=self.cfg.round_steps,
                                                   seed=self.cfg.seed + r, resume=False),
                              out_dir=round_dir, name="qipo")
            result = trainer.fit()
            from energyflow.runtime import atomic_torch_save

            atomic_torch_save(policy.state_dict(), os.path.join(round_dir, "policy.pt"))
            record = {"round": r, "q_support_mean": float(batch["q"].mean()),
                      "ess_fraction": result.metrics.get("qipo/ess_fraction"), "loss": result.metrics.get("qipo/loss")}
            if evaluate is not None:
                record.update(evaluate(policy.eval(), r))
            records.append(record)
            self._append(log_path, record)
        stage.finish({"rounds": max(len(records), len(all_rounds)) - 1})
        return records

    # -- the QGPO baseline --------------------------------------------------------------------------
    @property
    def qgpo_stage(self) -> Stage:
        c = self.cfg
        return Stage("qgpo_energy", {"beta": c.beta, "num_support": c.num_support,
                                     **{k: v for k, v in c.qgpo.items() if k != "scale"}, "seed": c.seed},
                     self.cache_dir, upstream=[self.behaviour_stage, self.critic_stage])

    def qgpo_predictor(self, behaviour: Optional[GenerativePolicy] = None):
        """QGPO: μ guided by ∇f, with f trained by contrastive energy prediction on μ's support actions
        weighted by softmax(β·Q̃) (the same weights QIPO uses): a gradient per sampling step."""
        mu = behaviour or self.behaviour()
        critic = self.critic(mu)
        q = self.cfg.qgpo
        net = MLPEnergyNet(self.data.act_dim, hidden=q["hidden"], depth=q["depth"], cond_dim=self.data.obs_dim).to(self.device)

        def train(out_dir: str) -> dict:
            saved = torch.load(self.critic_stage.file("support.pt"))  # clipped μ actions at dataset states
            support, idx = saved["support"], saved["index"]
            n = support.shape[0]
            obs_n = self._norm(self.data.next_observations[idx])
            m = self.cfg.num_support
            with torch.no_grad():
                qv = torch.cat([critic.min_q_groups(obs_n[i:i + 4096].to(self.device), support[i:i + 4096].to(self.device)).cpu()
                                for i in range(0, n, 4096)])
            source = TensorBatchSource({"x1": support, "cond": obs_n.unsqueeze(1).expand(-1, m, -1),
                                        "energy": -standardize_within_groups(qv)}, group_size=m)
            torch.manual_seed(self.cfg.seed)
            objective = ContrastiveEnergyLoss(mu.path, self.cfg.beta, m)
            settings = {k: v for k, v in q.items() if k not in ("hidden", "depth", "scale")}
            trainer = Trainer(net, objective, source, self._trainer_config(settings), out_dir=out_dir, name="qgpo")
            result = trainer.fit()
            net.load_state_dict(trainer.ema_module.state_dict())
            torch.save(net.state_dict(), os.path.join(out_dir, "energy.pt"))
            return {"final": result.metrics}

        stage = self.qgpo_stage
        stage.run(train)
        net.load_state_dict(torch.load(stage.file("energy.pt"), map_location=self.device))
        return CEPGuidedPredictor(mu.predictor(), net.eval(), scale=float(q.get("scale", 1.0)))

    @staticmethod
    def _append(path: str, record: dict) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def config_dict(self) -> dict:
        return asdict(self.cfg)
