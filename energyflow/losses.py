"""Training objectives: flow matching / denoising, energy-weighted (EFM), grouped, and QGPO's CEP.

Every objective is a callable ``objective(net, batch) -> LossOutput``.  A batch is a dict:

* ``"x1"``: ``[B, ...]`` data (required);
* ``"cond"``: conditioning, first dimension ``B`` (optional);
* ``"energy"``: ``[B]`` pre-computed energies (optional; otherwise the objective's ``energy`` is
  called on ``x1`` — energies depend on data only, never on x_t);
* ``"x0"``, ``"t"``: pre-drawn noise ``[B, ...]`` and times ``[B]`` (optional; the trainer draws them
  for the global batch so that data-parallel and single-process runs see the same numbers);
* ``"mask"``: ``[B, N]`` (or any leading shape of ``x1``) with 1 for real elements and 0 for padding
  (optional; padded sets, point clouds, graphs with padded nodes).

Per-sample losses are squared errors averaged over the non-batch dimensions — over the *real*
elements only when the batch has a mask, so padding a batch to a larger ``N`` changes nothing.
Whatever a sample's shape, it gets one energy and one weight.  A masked batch's network receives
its mask inside ``cond``: ``cond = {"mask": mask, **cond}`` (a tensor ``cond`` goes under ``"cond"``).
Noise comes from the objective's :class:`~energyflow.priors.Prior` (Gaussian by default), which
the samplers' initial noise must share (:func:`energyflow.sampling.initial_noise`).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .energies import Energy
from .paths import CondOTPath, Path, Prediction, VPPath
from .priors import GaussianPrior, Prior, build_coupling, expand_mask
from .weights import energy_weights

__all__ = [
    "Objective",
    "LossOutput",
    "FlowMatchingLoss",
    "EnergyWeightedLoss",
    "OneHotCrossEntropy",
    "ContrastiveEnergyLoss",
    "ClassificationLoss",
    "OneStepDistillationLoss",
    "energy_weighted_flow_matching",
    "energy_weighted_diffusion",
    "draw_noise_and_time",
    "network_cond",
]


@dataclass
class LossOutput:
    """A scalar ``loss`` to minimise, the ``[B]`` per-sample losses, the weights used (or ``None``)
    and ``metrics`` for logging (keys without namespace, e.g. ``"loss"``, ``"ess"``): detached 0-d
    tensors, so that a training step never waits on the device; ``float()`` them to read them."""

    loss: Tensor
    per_sample: Tensor
    weights: Optional[Tensor] = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective(abc.ABC):
    """What the :class:`~energyflow.trainer.Trainer` minimises: the contract every training loss keeps.

    The trainer draws the *global* batch (identical on every data-parallel rank), calls
    :meth:`prepare` on it with its seeded noise generator, gives each rank a contiguous slice, and
    calls the objective on the slice.  So everything random about a step (noise, times) must be
    drawn in :meth:`prepare`; then single-process, data-parallel and resumed runs agree exactly.

    Attributes:
        group_size: ``M`` when the batch holds consecutive groups of ``M`` samples that belong
            together (grouped weights, contrastive losses): the trainer checks that every rank's
            slice holds whole groups.  ``None``: samples are independent.
        group_time: with ``group_size``, whether :meth:`prepare` draws one flow time per group
            (``True``) or one per sample.
        uses_target: when ``True`` the trainer passes its EMA network as ``target=`` (a Polyak
            target network, e.g. a critic's); objectives never hold a reference to it themselves.
    """

    group_size: Optional[int] = None
    group_time: bool = True
    uses_target: bool = False

    def prepare(self, batch: dict[str, Any], generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """Draw this step's randomness for the global ``batch`` (default: none); returns the batch."""
        return batch

    @abc.abstractmethod
    def __call__(self, net: Callable[..., Any], batch: dict[str, Any], generator: Optional[torch.Generator] = None,
                 *, target: Optional[Any] = None) -> "LossOutput":
        """The loss of ``net`` on this rank's ``batch`` (keys: see the module docstring)."""


def draw_noise_and_time(path: Path, x1: Tensor, generator: Optional[torch.Generator] = None,
                        group_size: Optional[int] = None, prior: Optional[Prior] = None,
                        mask: Optional[Tensor] = None, coupling: Optional[Callable[..., Tensor]] = None
                        ) -> tuple[Tensor, Tensor]:
    """Noise ``x0`` from ``prior`` (default N(0, I); zero on padding) like ``x1`` and times
    ``t ~ U[t_min, t_max]`` (one per group if given).  A ``coupling`` ``f(x0, x1, mask) -> x0'``
    (e.g. :func:`~energyflow.priors.kabsch_align`) pairs each noise sample with its data sample.

    Drawn on the generator's device (a CPU generator gives the same numbers whatever the device of
    ``x1``), then moved to ``x1``'s device.
    """
    where = generator.device if generator is not None else x1.device
    x0 = (prior or GaussianPrior()).sample(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype,
                                           mask=mask)
    if coupling is not None:
        x0 = coupling(x0, x1, mask)
    n = x1.shape[0] if group_size is None else x1.shape[0] // group_size
    t = path.sample_time(n, generator=generator, device=where, dtype=x1.dtype).to(x1.device)
    if group_size is not None:
        t = t.repeat_interleave(group_size)
    return x0, t


def network_cond(batch: dict[str, Any]) -> Any:
    """What the network receives as ``cond``: the batch's ``cond``, with its ``mask`` added when
    the batch is masked (see the module docstring)."""
    cond, mask = batch.get("cond"), batch.get("mask")
    if mask is None:
        return cond
    if cond is None:
        return {"mask": mask}
    if isinstance(cond, dict):
        return {**cond, "mask": mask}
    return {"cond": cond, "mask": mask}


def masked_mean_per_sample(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``[B]`` means of ``values`` ([B, ...]) over the non-batch dimensions (real elements only)."""
    if mask is None:
        return values.reshape(values.shape[0], -1).mean(1)
    m = expand_mask(mask, values)
    count = m.reshape(values.shape[0], -1).sum(1)
    if bool((count == 0).any()):
        raise ValueError(f"{int((count == 0).sum())} sample(s) of the batch have an all-zero mask")
    return (values * m).reshape(values.shape[0], -1).sum(1) / count


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class OneHotCrossEntropy:
    """Cross-entropy error of a clean-data prediction of one-hot data in ±``scale`` units.

    Data ``x1 = scale·(2·onehot − 1)`` over the last dimension (categories) and a prediction
    ``x̂1 = scale·(2·p − 1)`` with ``p`` on the simplex (a softmax head) give the elementwise error
    ``−onehot·log p``, whose mean over a sample is its cross-entropy divided by the number of
    categories.  It is a Bregman divergence, so its minimiser is E[x1 | x_t] like the squared
    error's, with a stronger gradient where the prediction is confidently wrong.
    """

    def __init__(self, scale: float = 1.0, eps: float = 1e-6):
        self.scale, self.eps = float(scale), float(eps)

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        p = ((pred / self.scale + 1.0) * 0.5).clamp_min(self.eps)
        onehot = (target / self.scale + 1.0) * 0.5
        return -(onehot * p.log())


class FlowMatchingLoss(Objective):
    """Plain flow matching (OT path) or denoising (VP path, ε target): ``mean_i ℓ_i``.

    Args:
        path: the probability path.
        prediction: what the network predicts (``"velocity"``, ``"epsilon"``, ``"x1"``, ``"score"``);
            defaults to ``path.default_prediction`` (velocity for OT, ε for VP).
        prior: the noise distribution (default :class:`~energyflow.priors.GaussianPrior`).
        coupling: how each noise sample is paired with its data sample: ``None`` (independent) or
            ``"kabsch"`` (the noise rotated onto the data, :func:`~energyflow.priors.kabsch_align`;
            rotation-invariant sets such as molecules).
        error: the elementwise error ``error(pred, target) -> Tensor`` (same shape), averaged over each
            sample's (real) elements; default the squared error.  Any Bregman divergence (squared
            error, or the cross-entropy of a probability prediction against one-hot data, e.g.
            :class:`OneHotCrossEntropy`) is minimised by the conditional mean, so the learned field,
            and EFM's exactness, are unchanged; only the optimisation differs.
    """

    def __init__(self, path: Path, prediction: Optional[Prediction] = None, prior: Optional[Prior] = None,
                 coupling: Optional[str] = None, error: Optional[Callable[[Tensor, Tensor], Tensor]] = None):
        self.error = error
        self.path = path
        self.prediction: Prediction = prediction or path.default_prediction
        self.prior: Prior = prior or GaussianPrior()
        self.coupling_name = None if coupling in (None, "none", "independent") else str(coupling)
        self.coupling = build_coupling(coupling)

    group_size: Optional[int] = None

    def prepare(self, batch: dict[str, Any], generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """Return ``batch`` with noise ``"x0"`` and times ``"t"`` drawn for it (one t per group when
        grouped).  The trainer calls this on the *global* batch before splitting it across ranks."""
        if "x0" in batch and "t" in batch:
            return batch
        shared = self.group_size if self.group_time else None
        x0, t = draw_noise_and_time(self.path, batch["x1"], generator, shared, self.prior, batch.get("mask"),
                                    self.coupling)
        return {**batch, "x0": x0, "t": t}

    def per_sample(self, net: Callable[..., Tensor], batch: dict[str, Any],
                   generator: Optional[torch.Generator] = None, group_size: Optional[int] = None) -> Tensor:
        """``[B]`` squared errors of the network against the path's conditional target."""
        x1, mask = batch["x1"], batch.get("mask")
        if "x0" in batch and "t" in batch:
            x0, t = batch["x0"], batch["t"]
        else:
            x0, t = draw_noise_and_time(self.path, x1, generator, group_size, self.prior, mask, self.coupling)
        sample = self.path.sample(x0, x1, t)
        target = self.path.target(sample, self.prediction)
        pred = net(sample.xt, t, network_cond(batch))
        err = (pred - target).square() if self.error is None else self.error(pred, target)
        return masked_mean_per_sample(err, mask)

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Any],
                 generator: Optional[torch.Generator] = None, *, target: Any = None) -> LossOutput:
        per = self.per_sample(net, batch, generator)
        loss = per.mean()
        return LossOutput(loss=loss, per_sample=per, metrics={"loss": loss.detach()})


class EnergyWeightedLoss(FlowMatchingLoss):
    """Energy-weighted flow matching / diffusion: ``L = Σ_i w_i ℓ_i`` with ``w = softmax(−β E(x1))``.

    The minimiser transports noise to q ∝ p·exp(−βE) exactly (Zhang, Zhang & Gu, ICLR 2025).

    Args:
        path: the probability path (OT → EFM, VP → energy-weighted diffusion).
        beta: inverse temperature β ≥ 0; β = 0 is plain flow matching.
        energy: an :class:`~energyflow.energies.Energy` of the data, called on ``batch["x1"]`` when
            the batch carries no ``"energy"``; may be a black box (no gradient is taken).
        prediction: the network's parameterisation (default: the path's).
        group_size: ``M`` for grouped weights: the batch holds ``G`` consecutive groups of ``M``
            samples (e.g. the M support actions of one state) and the softmax runs within each
            group; ``L = (1/G) Σ_g Σ_j w_gj ℓ_gj``.  ``None``: one softmax over the whole batch.
        nonfinite: ``"raise"`` (default) or ``"mask"`` non-finite energies (weight 0).
        prior: the noise distribution (default N(0, I)).
        group_time: with ``group_size``, draw one flow time per group (default: the group's
            samples are compared at one noise level) or, ``False``, one per sample.  Both are
            unbiased for the same minimiser; they differ in variance.
        coupling: the noise–data pairing (see :class:`FlowMatchingLoss`).
        error: the elementwise error (see :class:`FlowMatchingLoss`).

    Metrics: ``loss``, ``ess`` (effective sample size, per group when grouped) and ``ess_fraction``.
    Under data-parallel training, whole-batch weights are normalised over the global batch.
    """

    def __init__(self, path: Path, beta: float, energy: Optional[Energy] = None,
                 prediction: Optional[Prediction] = None, group_size: Optional[int] = None,
                 nonfinite: str = "raise", prior: Optional[Prior] = None, group_time: bool = True,
                 coupling: Optional[str] = None, error: Optional[Callable[[Tensor, Tensor], Tensor]] = None):
        super().__init__(path, prediction, prior, coupling, error)
        self.beta, self.energy, self.group_size, self.nonfinite = float(beta), energy, group_size, nonfinite
        self.group_time = bool(group_time)

    def energies(self, batch: dict[str, Any]) -> Tensor:
        if "energy" in batch:
            return batch["energy"]
        if self.energy is None:
            raise ValueError("EnergyWeightedLoss needs an `energy` or batches with an 'energy' entry")
        with torch.no_grad():
            return self.energy(batch["x1"], batch.get("cond"), mask=batch.get("mask"))

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Any],
                 generator: Optional[torch.Generator] = None, *, target: Any = None) -> LossOutput:
        w = energy_weights(self.energies(batch), self.beta, self.group_size, self.nonfinite, global_batch=True)
        per = self.per_sample(net, batch, generator, self.group_size if self.group_time else None)
        weighted = w.weights.to(per.dtype) * per
        if self.group_size is None:
            # Σ_i w_i ℓ_i over the (global) batch; data-parallel averaging divides by the world size.
            loss = weighted.sum() * _world_size()
        else:
            loss = weighted.sum() / w.num_groups
        metrics = {"loss": loss.detach(), "ess": w.ess, "ess_fraction": w.ess_fraction}
        return LossOutput(loss=loss, per_sample=per, weights=w.weights, metrics=metrics)


def energy_weighted_flow_matching(beta: float, energy: Optional[Energy] = None, **kwargs) -> EnergyWeightedLoss:
    """EFM on the conditional-OT path (velocity target)."""
    return EnergyWeightedLoss(CondOTPath(), beta, energy, **kwargs)


def energy_weighted_diffusion(beta: float, energy: Optional[Energy] = None, schedule: str = "linear",
                              **kwargs) -> EnergyWeightedLoss:
    """Energy-weighted denoising on the VP path (ε target)."""
    return EnergyWeightedLoss(VPPath(schedule=schedule), beta, energy, prediction="epsilon", **kwargs)


class ContrastiveEnergyLoss(Objective):
    """QGPO's contrastive energy prediction (CEP) for a time-dependent energy ``f(x_t, t, cond) -> [B]``.

    The batch holds ``G`` groups of ``M`` samples (``x1`` of one group share the condition); all
    members of a group are noised to the same ``t``.  With targets ``w = softmax_j(−β E(x1_j))``,

        L = −(1/G) Σ_g Σ_j w_gj · log softmax_j f(x_t,gj, t_g),

    whose optimum is f = log E[exp(−β E(x1)) | x_t] + const: its gradient is the exact guidance
    term ∇ log q_t − ∇ log p_t.  Used as the gradient-guidance baseline EFM replaces.
    """

    def __init__(self, path: Path, beta: float, group_size: int, energy: Optional[Energy] = None,
                 prior: Optional[Prior] = None):
        self.path, self.beta, self.group_size, self.energy = path, float(beta), int(group_size), energy
        self.prior: Prior = prior or GaussianPrior()
        self.coupling = None          # independent noise (what prepare, shared with FlowMatchingLoss, reads)

    prepare = FlowMatchingLoss.prepare

    def __call__(self, energy_net: Callable[..., Tensor], batch: dict[str, Any],
                 generator: Optional[torch.Generator] = None, *, target: Any = None) -> LossOutput:
        x1, m = batch["x1"], self.group_size
        energies = batch["energy"] if "energy" in batch else self.energy(x1, batch.get("cond"))
        w = energy_weights(energies.detach(), self.beta, m).weights.view(-1, m)
        if "x0" in batch and "t" in batch:
            x0, t = batch["x0"], batch["t"]
        else:
            x0, t = draw_noise_and_time(self.path, x1, generator, m, self.prior, batch.get("mask"))
        xt = self.path.sample(x0, x1, t).xt
        logits = energy_net(xt, t, batch.get("cond")).view(-1, m)
        per_group = -(w * torch.log_softmax(logits, dim=1)).sum(1)
        loss = per_group.mean()
        return LossOutput(loss=loss, per_sample=per_group.repeat_interleave(m), weights=w.reshape(-1),
                          metrics={"loss": loss.detach()})


class ClassificationLoss(Objective):
    """Cross-entropy of a classifier ``net(x) -> logits [B, K]`` on batches ``{"x1": x, "cond": labels [B]}``.

    Trains the classifiers that define classifier energies E(x) = −log p(y ∈ S | x) and the
    independent classifiers that evaluate samples; with the :class:`~energyflow.trainer.Trainer`
    it gets EMA, checkpoints, exact resume and data-parallel training like every generative model.

    Metrics: ``loss`` and ``accuracy`` (of the batch, before the step).
    """

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Any], generator: Optional[torch.Generator] = None,
                 *, target: Any = None) -> LossOutput:
        labels = batch["cond"]
        logits = net(batch["x1"])
        per = torch.nn.functional.cross_entropy(logits, labels.long(), reduction="none")
        loss = per.mean()
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return LossOutput(loss=loss, per_sample=per, metrics={"loss": loss.detach(), "accuracy": accuracy})


class OneStepDistillationLoss(Objective):
    """Distil a flow (or diffusion) model into a one-step generator: a *flow-map* regression.

    The teacher's sampler is a deterministic map from noise to data, ``x1 = Φ(x0 | cond)``; the
    student ``net`` learns it in one evaluation, parameterised as one Euler step of a velocity
    field on the OT path: ``x̂1 = x0 + net(x0, t=0, cond)``.  So the student is an ordinary
    velocity model whose sampler is Euler with **1 step**: it is saved, loaded and sampled like
    any other model (initialising it with the teacher's weights starts it at the teacher's own
    one-step Euler).  ``L = mean ‖x0 + net(x0, 0, cond) − Φ(x0 | cond)‖²``; its minimiser is Φ
    itself, so the student's samples have the teacher's distribution (not only its mean).

    Args:
        teacher: ``teacher(x0, cond) -> x1``, the teacher's sampler from given noise (no gradient
            is taken through it).
        prior: the noise distribution (default N(0, I)); the teacher's.

    Batch keys: ``x1`` (any data batch: only its shape and device are used; the targets are the
    teacher's), ``cond`` (optional).  :meth:`prepare` draws the noise and the teacher's targets on
    the global batch (keys ``x0`` and ``target``).
    """

    def __init__(self, teacher: Callable[[Tensor, Any], Tensor], prior: Optional[Prior] = None):
        self.teacher = teacher
        self.prior: Prior = prior or GaussianPrior()

    def prepare(self, batch: dict[str, Any], generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        if "x0" in batch and "target" in batch:
            return batch
        x1 = batch["x1"]
        x0 = self.prior.sample(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        with torch.no_grad():
            target = self.teacher(x0, batch.get("cond"))
        return {**batch, "x0": x0, "target": target.detach()}

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Any],
                 generator: Optional[torch.Generator] = None, *, target: Any = None) -> LossOutput:
        batch = self.prepare(batch, generator)
        x0 = batch["x0"]
        pred = x0 + net(x0, torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype), batch.get("cond"))
        per = masked_mean_per_sample((pred - batch["target"]).square(), None)
        loss = per.mean()
        return LossOutput(loss=loss, per_sample=per.detach(), metrics={"loss": loss.detach()})
