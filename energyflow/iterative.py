"""Iterative EFM: tilt a model step by step along a β schedule, from its own samples.

One batch of data expresses ``q ∝ p·exp(−βE)`` only where ``p`` has mass: the weights
``softmax(−βE)`` of a batch have an effective sample size of about ``B·exp(−Var(βE))``, so a
strong tilt leaves a handful of points carrying the whole batch, and one-shot EFM lands near the
data's lowest-energy edge instead of on ``q``.  Iterative EFM (``ALGORITHMS.md`` §8) walks there
in mild steps::

    model_0 = a model of p (or any pretrained model: no data is needed, only its samples)
    for k = 1..K:   x ~ model_{k−1};  w = softmax(−Δβ_k E(x)) per batch;  fit model_k by EFM on (x, w),
                    starting from model_{k−1}
    after K rounds the target is p·exp(−β_K E),  β_K = β_0 + Σ Δβ_k

**Why each round is exact.**  If ``model_{k−1}`` samples ``q_{k−1} ∝ p·exp(−β_{k−1}E)``, then
``q_{k−1}·exp(−Δβ_k E) ∝ p·exp(−β_k E) = q_k``, and EFM on samples of ``q_{k−1}`` with weights
``softmax(−Δβ_k E)`` learns the field that transports noise to ``q_k`` (Theorem 4.3 of Zhang,
Zhang & Gu, ICLR 2025; ``ALGORITHMS.md`` §3).  Each round is a mild tilt, so its batch ESS stays
high, and its fresh samples come from where the *current* model has mass: the chain reaches
targets outside the data's support.  The errors of the fits compound through the rounds, so
measure against an exact target where one exists and watch the ESS of every round.

**Schedules.**  A fixed list of increasing β (each round tilts by the difference), or an
:class:`AdaptiveSchedule`, the tempering rule of sequential Monte Carlo: each round takes the
largest Δβ whose mean batch ESS on the fresh samples stays above a fraction ρ of the batch.

**Conditional and grouped tilts (offline RL).**  With ``cond`` and ``group_size=M`` every round
draws ``M`` samples per condition and normalises the weights within each condition's group —
QIPO's support renewal (``ALGORITHMS.md`` §4) is this loop with ``E(s, a) = −Q(s, a)``,
``cond`` = a fresh draw of dataset states each round (a callable), and ``energy_transform`` =
standardisation of the energies within each group.

Nothing here depends on the data's shape: samples are ``[N, *event_shape]``.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .data import TensorBatchSource
from .energies import Energy
from .files import append_jsonl, atomic_torch_save, load_torch, read_jsonl
from .losses import EnergyWeightedLoss
from .paths import Path, Prediction
from .predictor import Predictor
from .models import MODEL_FORMAT, save_model_file
from .priors import Prior
from .samplers import Sampler
from .sampling import initial_noise, sampler_from_config
from .trainer import Trainer, TrainerConfig, TrainResult
from .weights import energy_weights

__all__ = [
    "AdaptiveSchedule",
    "RoundRecord",
    "IterativeResult",
    "iterative_tilt",
    "fit_tilted",
    "draw_samples",
    "batch_ess_fraction",
    "choose_delta_beta",
]

CondLike = Union[Tensor, Callable[[int, torch.Generator], Tensor], None]

ROUND_TRAINER_DEFAULTS: dict[str, Any] = {"progress": False, "tensorboard": False}


@dataclass
class AdaptiveSchedule:
    """Choose each round's Δβ from the fresh samples (SMC tempering).

    Each round takes the largest ``Δβ ≤ beta_max − β`` whose mean batch ESS fraction (weights
    ``softmax(−Δβ E)`` over consecutive batches of ``batch_size`` fresh samples, or within each
    group) is at least ``min_ess_fraction``, found by bisection; the loop stops once ``β`` reaches
    ``beta_max``, or raises after ``max_rounds`` rounds.

    Attributes:
        beta_max: the final β.
        min_ess_fraction: ρ in (0, 1]; 0.5 is the usual choice.
        max_rounds: the most rounds allowed to reach ``beta_max``.
        batch_size: the batch over which the ESS is measured (``None``: the trainer's batch size).
        min_delta_beta: the smallest step taken, so that a collapsed model still advances.
    """

    beta_max: float
    min_ess_fraction: float = 0.5
    max_rounds: int = 20
    batch_size: Optional[int] = None
    min_delta_beta: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 < self.min_ess_fraction <= 1:
            raise ValueError(f"min_ess_fraction must be in (0, 1], got {self.min_ess_fraction}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")


@dataclass
class RoundRecord:
    """What one round did and measured.

    Attributes:
        round: ``k`` (1-based).
        beta: ``β_k``, the target's β after this round.
        delta_beta: ``Δβ_k = β_k − β_{k−1}``, the tilt applied in this round.
        ess_fraction: mean ESS / batch size of the weights ``softmax(−Δβ_k E)`` over batches of
            the fresh samples (the trainer's batch size; within each group when grouped).
        mean_energy: mean energy of the fresh samples of ``model_{k−1}``.
        tilted_mean_energy: self-normalised estimate, over all fresh samples, of the mean energy
            under ``q_k`` (what ``model_k`` should reach).
        loss: the trainer's last logged ``train/loss``.
        train_ess_fraction: the trainer's last logged ``train/ess_fraction``.
        sample_seconds, train_seconds: wall times of the two phases.
        metrics: whatever the ``callback`` returned for ``model_k``.
    """

    round: int
    beta: float
    delta_beta: float
    ess_fraction: float
    mean_energy: float
    tilted_mean_energy: float
    loss: float
    train_ess_fraction: float
    sample_seconds: float
    train_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class IterativeResult:
    """The tilted model (``net``, in eval mode) and one :class:`RoundRecord` per round."""

    net: nn.Module
    records: list[RoundRecord]

    @property
    def betas(self) -> list[float]:
        """``β_k`` of every round."""
        return [r.beta for r in self.records]


def batch_ess_fraction(energies: Tensor, delta_beta: float, batch_size: int,
                       group_size: Optional[int] = None) -> float:
    """Mean ESS fraction of ``softmax(−Δβ E)`` over consecutive batches of ``energies`` ``[N]``.

    With ``group_size`` the weights are normalised within each group of consecutive samples
    (``N`` a multiple of it) and the mean ESS fraction over the groups is returned; otherwise over
    the ``N // batch_size`` whole batches (a shorter remainder is dropped; ``N < batch_size``
    uses one batch of all ``N``).  The samples must be in random order (fresh i.i.d. draws are).
    """
    energies = energies.detach().reshape(-1)
    if group_size is not None:
        return float(energy_weights(energies, delta_beta, group_size).ess_fraction)
    b = min(int(batch_size), energies.numel())
    n = (energies.numel() // b) * b
    return float(energy_weights(energies[:n], delta_beta, b).ess_fraction)


def choose_delta_beta(energies: Tensor, max_delta: float, min_ess_fraction: float, batch_size: int,
                      group_size: Optional[int] = None, min_delta: float = 1e-3, iterations: int = 40) -> float:
    """The largest ``Δβ ∈ [min_delta, max_delta]`` whose :func:`batch_ess_fraction` is ≥ ``min_ess_fraction``.

    Bisection (the ESS of a batch falls as Δβ grows).  Returns ``max_delta`` when it already
    qualifies, and ``min(min_delta, max_delta)`` when nothing does.
    """
    if max_delta <= 0:
        raise ValueError(f"max_delta must be > 0, got {max_delta}")

    def ok(d: float) -> bool:
        return batch_ess_fraction(energies, d, batch_size, group_size) >= min_ess_fraction

    if ok(max_delta):
        return float(max_delta)
    lo, hi = 0.0, float(max_delta)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return float(min(max(lo, min_delta), max_delta))


@torch.no_grad()
def draw_samples(net: nn.Module, path: Path, num_samples: int, event_shape: Sequence[int],
                 sampler: Sampler, generator: torch.Generator, cond: Any = None,
                 prediction: Optional[Prediction] = None, chunk: int = 65536,
                 device: Optional[torch.device] = None, prior: Optional[Prior] = None) -> Tensor:
    """``[num_samples, *event_shape]`` samples of ``net`` on ``path``, on the CPU.

    The noise is drawn from ``prior`` (default N(0, I)) with the CPU ``generator`` in one call
    (:func:`energyflow.sampling.initial_noise`, so the samples do not depend on ``chunk``), then
    integrated in chunks of ``chunk`` on ``device`` (default: the net's).
    ``cond``, if given, has first dimension ``num_samples`` and is sliced with the chunks.
    """
    device = device or next(net.parameters()).device
    was_training = net.training
    net.eval()
    predictor = Predictor(net, path, prediction)
    x0 = initial_noise(int(num_samples), event_shape, prior=prior, generator=generator)
    out = []
    for i in range(0, x0.shape[0], chunk):
        c = None if cond is None else cond[i:i + chunk].to(device)
        out.append(sampler.sample(predictor, x0[i:i + chunk].to(device), c, generator=generator).x.cpu())
    net.train(was_training)
    return torch.cat(out) if out else x0


@torch.no_grad()
def _energies(energy: Energy, x: Tensor, cond: Any, chunk: int, device: torch.device) -> Tensor:
    out = []
    for i in range(0, x.shape[0], chunk):
        c = None if cond is None else cond[i:i + chunk].to(device)
        out.append(energy(x[i:i + chunk].to(device), c).detach().to(torch.float64).cpu())
    return torch.cat(out)


def _build_sampler(sampler: Union[Sampler, dict, None]) -> Sampler:
    if isinstance(sampler, Sampler):
        return sampler
    return sampler_from_config({"name": "heun", "steps": 50}, sampler)


def fit_tilted(model: nn.Module, path: Path, x: Tensor, energies: Tensor, delta_beta: float,
               trainer: Union[TrainerConfig, dict], *, cond: Optional[Tensor] = None, group_size: Optional[int] = None,
               prediction: Optional[Prediction] = None, prior: Optional[Prior] = None, out_dir: Optional[str] = None,
               name: str = "train", group_time: bool = True,
               optimizer_state: Optional[dict] = None,
               error: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> tuple[Trainer, TrainResult]:
    """One round's fit: train ``model`` **in place** by EFM at ``delta_beta`` on fixed samples.

    ``x`` ``[N, ...]`` are samples of the current model (of ``q_{k−1}``) and ``energies`` ``[N]``
    their energies (already transformed if the caller standardises them); with ``group_size=M`` the
    ``N = S·M`` samples form ``S`` consecutive groups whose weights are normalised within each group,
    and ``cond`` ``[N, ...]`` (the same within a group) conditions the model.  The minimiser samples
    ``q_{k−1}·exp(−Δβ E) ∝ q_k``.  Every loop of rounds calls this: :func:`iterative_tilt` with its
    own samples, QIPO's renewals (``domains/rl/qipo.py``) with a policy's actions scored by a critic.

    ``group_time`` (with ``group_size``): one flow time per group (default) or per sample (see
    :class:`~energyflow.losses.EnergyWeightedLoss`).  ``optimizer_state``: an AdamW state dict
    (``trainer.optimizer.state_dict()`` of the previous round) to continue from instead of a fresh
    optimiser, so that one optimiser runs across rounds.  ``error``: the loss's elementwise error
    (:class:`~energyflow.losses.FlowMatchingLoss`; default squared).

    Returns:
        the :class:`~energyflow.trainer.Trainer` after ``fit()`` (its ``ema_module`` and ``model``)
        and the fit's :class:`~energyflow.trainer.TrainResult`.
    """
    tensors = {"x1": x, "energy": energies.to(x.dtype)}
    if cond is not None:
        tensors["cond"] = cond
    if group_size is not None:
        tensors = {key: v.reshape(-1, group_size, *v.shape[1:]) for key, v in tensors.items()}
    source = TensorBatchSource(tensors, group_size=group_size)
    objective = EnergyWeightedLoss(path, delta_beta, prediction=prediction, group_size=group_size, prior=prior,
                                   group_time=group_time, error=error)
    fit = Trainer(model.train(), objective, source, trainer, out_dir=out_dir, name=name)
    if optimizer_state is not None:
        fit.load_optimizer_state(optimizer_state)
    return fit, fit.fit()


def _save_round_model(net: nn.Module, path: Path, prediction: Optional[Prediction], meta: dict, file: str) -> None:
    """A round's model: a self-describing model file when the network's class is registered, else its weights."""
    if hasattr(net, "registered_name"):
        save_model_file(file, net, path=path, prediction=prediction, meta=meta)
    else:
        atomic_torch_save(net.state_dict(), file)


def _round_cond(cond: CondLike, k: int, generator: torch.Generator) -> Optional[Tensor]:
    if cond is None:
        return None
    return cond(k, generator) if callable(cond) else cond


def iterative_tilt(
    net: nn.Module,
    path: Path,
    energy: Energy,
    schedule: Union[Sequence[float], AdaptiveSchedule],
    num_samples: int,
    event_shape: Sequence[int],
    *,
    trainer: Union[TrainerConfig, dict, None] = None,
    sampler: Union[Sampler, dict, None] = None,
    prediction: Optional[Prediction] = None,
    cond: CondLike = None,
    group_size: Optional[int] = None,
    energy_transform: Optional[Callable[[Tensor], Tensor]] = None,
    beta_start: float = 0.0,
    use_ema: bool = True,
    seed: int = 0,
    out_dir: Optional[str] = None,
    chunk: int = 65536,
    callback: Optional[Callable[[nn.Module, RoundRecord], dict]] = None,
    prior: Optional[Prior] = None,
    sample_transform: Optional[Callable[[Tensor], Tensor]] = None,
    error: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
) -> IterativeResult:
    """Tilt a trained model along a β schedule by iterative EFM (see the module docstring).

    Round ``k`` draws ``num_samples`` fresh samples of the current model (seeded, no gradient),
    computes their energies once, and fits a copy of the current model (warm start) with
    :class:`~energyflow.losses.EnergyWeightedLoss` at ``Δβ_k`` on a
    :class:`~energyflow.data.TensorBatchSource` of ``{"x1", "energy"[, "cond"]}``.  The input
    ``net`` is never modified.

    Args:
        net: the model of ``q_0 ∝ p·exp(−beta_start·E)``, ``net(x, t, cond)`` (e.g. a flow-matching
            model of the data, ``beta_start = 0``).  No training data is needed.
        path: the path ``net`` was trained on (its samples are drawn and refitted on it).
        energy: ``E(x, cond) -> [B]``, lower preferred; evaluated once per sample, never differentiated.
        schedule: increasing β values ``β_1 < … < β_K`` (all ``> beta_start``; round ``k`` tilts by
            ``β_k − β_{k−1}``), or an :class:`AdaptiveSchedule`.
        num_samples: fresh samples per round ``N``.  Grouped: ``S·M`` for ``S`` conditions.
        event_shape: the shape of one sample (``(2,)`` for 2-D points, ``(C, H, W)`` for images).
        trainer: :class:`~energyflow.trainer.TrainerConfig` (or its fields) for every round;
            ``seed`` is offset by the round, progress bar and tensorboard are off unless asked for.
        sampler: a :class:`~energyflow.samplers.Sampler` or ``{"name", "steps", ...}`` for
            :func:`~energyflow.samplers.build_sampler` (default Heun, 50 steps).
        prediction: what ``net`` predicts (default: the path's).
        cond: conditions, first dimension ``N`` (or ``S`` when grouped), or a callable
            ``cond(k, generator) -> Tensor`` giving round ``k``'s conditions (e.g. a fresh draw of
            dataset states).  ``None`` for an unconditional model.
        group_size: ``M``: draw ``M`` samples per condition (``cond`` then has ``S = N / M`` rows,
            each repeated ``M`` times) and normalise the weights within each group; the fit is
            ``q_k(x | c) ∝ q_{k−1}(x | c)·exp(−Δβ E(x, c))`` for every condition at once.
        energy_transform: optional map of the round's ``[N]`` energies (groups consecutive) to the
            energies used for the weights, e.g. standardisation within groups.  The schedule's β
            then multiplies the transformed energies.
        beta_start: β of ``net``'s own distribution.
        use_ema: continue each round from the trainer's EMA weights (``False``: the raw weights).
        seed: seeds the samples (round ``k``: ``seed + 7919·k``) and the trainers (``seed + k``).
        out_dir: if given, round ``k`` writes ``round<k>/`` (trainer checkpoint and logs,
            ``model.pt``) and appends its record to ``rounds.jsonl``; a rerun with the same
            ``out_dir`` resumes after the last recorded round (a different schedule is refused).
        chunk: samples per sampler / energy call.
        callback: ``callback(model_k, record) -> dict`` after each round (e.g. a distance to an
            exact target); its floats go to ``record.metrics``.
        prior: the noise distribution ``net`` was trained from (default N(0, I)): the rounds'
            samples and fits use it too.
        sample_transform: optional map of each round's fresh samples ``[N, *event_shape]`` before
            they are scored and fitted, e.g. the projection of a continuous relaxation onto its
            discrete values (one-hot tokens), so that the energy scores and the next model learns
            exactly the objects that decoding yields.  ``None``: the raw samples.
        error: the elementwise error of every round's loss (the one ``net`` was trained with; see
            :class:`~energyflow.losses.FlowMatchingLoss`).

    Returns:
        :class:`IterativeResult` with the final model (eval mode, on the net's device) and the
        records of rounds ``1..K`` (including resumed ones).

    Raises:
        ValueError: a schedule that is empty, not increasing, or not above ``beta_start``; a
            grouped call whose ``num_samples`` is not ``S·M``; a resumed ``out_dir`` whose recorded
            β values differ from ``schedule``.
    """
    adaptive = isinstance(schedule, AdaptiveSchedule)
    betas: list[float] = [] if adaptive else [float(b) for b in schedule]
    if not adaptive:
        if not betas:
            raise ValueError("schedule is empty")
        steps = [b - a for a, b in zip([float(beta_start)] + betas[:-1], betas)]
        if min(steps) <= 0:
            raise ValueError(f"schedule must increase from beta_start={beta_start}, got {betas}")
    elif schedule.beta_max <= beta_start:
        raise ValueError(f"beta_max {schedule.beta_max} must exceed beta_start {beta_start}")
    if group_size is not None and num_samples % group_size:
        raise ValueError(f"num_samples {num_samples} is not a multiple of group_size {group_size}")
    cfg = trainer if isinstance(trainer, TrainerConfig) else TrainerConfig(**{**ROUND_TRAINER_DEFAULTS, **(trainer or {})})
    smp = _build_sampler(sampler)
    event_shape = tuple(int(s) for s in event_shape)
    device = next(net.parameters()).device

    current = copy.deepcopy(net).eval()
    records: list[RoundRecord] = []
    log_path = os.path.join(out_dir, "rounds.jsonl") if out_dir else None
    if log_path and os.path.exists(log_path):
        for row in read_jsonl(log_path, what="rounds log"):
            records.append(RoundRecord(**row))
        if not adaptive and [r.beta for r in records] != betas[:len(records)]:
            raise ValueError(f"{out_dir} holds rounds at beta {[r.beta for r in records]}, which is not a prefix "
                             f"of the schedule {betas}; use a fresh out_dir")
        if records:
            state = load_torch(os.path.join(out_dir, f"round{records[-1].round}", "model.pt"), what="round model",
                               map_location=device)
            current.load_state_dict(state["state_dict"] if state.get("format") == MODEL_FORMAT else state)

    beta = records[-1].beta if records else float(beta_start)
    k = len(records)
    while True:
        if adaptive:
            if beta >= schedule.beta_max - 1e-12:
                break
            if k >= schedule.max_rounds:
                raise RuntimeError(f"adaptive schedule reached beta={beta:.4g} < {schedule.beta_max} "
                                   f"after max_rounds={schedule.max_rounds}")
        elif k >= len(betas):
            break
        k += 1
        g = torch.Generator().manual_seed(int(seed) + 7919 * k)
        t0 = time.perf_counter()
        c = _round_cond(cond, k, g)
        if group_size is not None:
            if c is None:
                raise ValueError("group_size needs cond (the M samples of a group share one condition)")
            if c.shape[0] * group_size != num_samples:
                raise ValueError(f"grouped: num_samples {num_samples} must equal len(cond) {c.shape[0]} "
                                 f"x group_size {group_size}")
            c = c.repeat_interleave(group_size, dim=0)
        elif c is not None and c.shape[0] != num_samples:
            raise ValueError(f"cond has {c.shape[0]} rows, expected num_samples={num_samples}")
        x = draw_samples(current, path, num_samples, event_shape, smp, g, c, prediction, chunk, device, prior)
        if sample_transform is not None:
            x = sample_transform(x)
        e = _energies(energy, x, c, chunk, device)
        if energy_transform is not None:
            e = energy_transform(e).to(torch.float64)
        if not bool(torch.isfinite(e).all()):
            raise ValueError(f"round {k}: non-finite energies of the model's samples")
        sample_seconds = time.perf_counter() - t0
        if adaptive:
            ess_batch = schedule.batch_size or cfg.batch_size
            left = schedule.beta_max - beta
            delta = choose_delta_beta(e, left, schedule.min_ess_fraction, ess_batch, group_size,
                                      min_delta=schedule.min_delta_beta)
            new_beta = schedule.beta_max if left - delta < 1e-9 else beta + delta
        else:
            ess_batch = cfg.batch_size
            new_beta = betas[k - 1]
        delta = new_beta - beta
        w_all = energy_weights(e, delta, group_size)
        record = RoundRecord(
            round=k, beta=new_beta, delta_beta=delta,
            ess_fraction=batch_ess_fraction(e, delta, ess_batch, group_size),
            mean_energy=float(e.mean()),
            tilted_mean_energy=float((w_all.weights.to(torch.float64) * e).sum() / w_all.num_groups),
            loss=math.nan, train_ess_fraction=math.nan, sample_seconds=round(sample_seconds, 3), train_seconds=0.0)

        round_dir = os.path.join(out_dir, f"round{k}") if out_dir else None
        fit, result = fit_tilted(copy.deepcopy(current), path, x, e, delta, {**asdict(cfg), "seed": cfg.seed + k},
                                 cond=None if c is None else c.cpu(), group_size=group_size, prediction=prediction,
                                 prior=prior, out_dir=round_dir, error=error)
        current = copy.deepcopy(fit.ema_module if use_ema else fit.model).eval()
        record.loss = float(result.metrics.get("train/loss", math.nan))
        record.train_ess_fraction = float(result.metrics.get("train/ess_fraction", math.nan))
        record.train_seconds = round(result.seconds, 3)
        if callback is not None:
            record.metrics = {key: float(v) for key, v in (callback(current, record) or {}).items()}
        if out_dir:
            _save_round_model(current, path, prediction, asdict(record), os.path.join(round_dir, "model.pt"))
            append_jsonl(log_path, asdict(record))
        records.append(record)
        beta = new_beta
    return IterativeResult(net=current, records=records)
