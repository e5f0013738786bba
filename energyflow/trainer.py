"""The trainer: the one place that owns the optimiser, EMA, device and process group.

It fits a network with any objective ``objective(net, batch) -> LossOutput`` (see
:mod:`energyflow.losses`) on batches from a :class:`~energyflow.data.BatchSource`, with AdamW,
gradient clipping, an EMA of the weights, seeded generators, a progress bar, JSONL + tensorboard
metrics, periodic evaluation hooks, atomic checkpoints with exact resume, and data-parallel
training under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU).

Reproducibility: the global batch, its noise and its times are drawn from two generators seeded
from ``seed`` and identical on every rank; each rank trains on a contiguous slice.  So a run on
``k`` processes follows the same loss curve as a single process with the same global batch, and a
resumed run continues exactly where the checkpoint left off.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .data import BatchSource
from .errors import CorruptFileError, InputError
from .files import atomic_torch_save, load_torch
from .runtime import DistInfo, init_distributed, resolve_device, set_threads
from .tracking import MetricLogger
from .validation import check_integer, check_number

__all__ = ["TrainerConfig", "Trainer", "EvalHook"]

EvalHook = Callable[["Trainer"], dict[str, float]]
"""An evaluation hook: called with the trainer every ``eval_every`` steps (main process only, with
the EMA weights in ``trainer.ema_model``); returns metrics logged under ``eval/``."""

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainerConfig:
    """Everything the trainer needs to know; config keys equal these argument names.

    Attributes:
        steps: total optimisation steps.
        batch_size: the *global* batch (split across data-parallel ranks).
        lr, weight_decay, adam_betas: AdamW settings.
        warmup_steps: linear learning-rate warm-up; then ``lr_schedule`` ("constant" or "cosine").
        ema_decay: EMA decay of the weights (0 disables: the EMA model is the model itself).
        grad_clip: max gradient norm (``None`` or 0 disables).
        seed: seeds the data and noise generators (seed the model's initialisation yourself, before
            building it, e.g. with :func:`energyflow.runtime.seed_everything`).
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1"...
        num_threads: torch intra-op threads: an integer, ``"auto"`` (the CPUs this process may use,
            divided among the data-parallel processes of this machine) or ``None`` (torch's default).
        log_every, eval_every, checkpoint_every: periods in steps (0 disables eval/checkpoints;
            a final checkpoint is always written).
        progress: show a tqdm progress bar (main process only).
        tensorboard: also write tensorboard event files.
        resume: continue from ``<out_dir>/checkpoint.pt`` when it exists.  The checkpoint's stored
            config must match this one in every field that changes the result (all but the
            logging, device and thread settings), else the trainer refuses it.
        min_ess_fraction: warn (once, on stderr and as ``<name>/ess_warning`` in the log) when the
            weights' effective sample size falls below this fraction of the batch (0 disables);
            see :func:`energyflow.weights.energy_weights`.

    Every value is checked when the config is built; a bad one raises
    :class:`~energyflow.errors.InputError` naming the setting.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    ema_decay: float = 0.999
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    device: str = "auto"
    num_threads: Optional[int] = None
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    tensorboard: bool = True
    resume: bool = True
    min_ess_fraction: float = 0.01

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            setattr(self, name, _integer(self, name, minimum=1))
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            setattr(self, name, _integer(self, name, minimum=0))
        self.seed = _integer(self, "seed", minimum=None)
        self.lr = _number(self, "lr", low=0.0, low_inclusive=False)
        self.weight_decay = _number(self, "weight_decay", low=0.0)
        self.ema_decay = _number(self, "ema_decay", low=0.0, high=1.0)
        self.min_ess_fraction = _number(self, "min_ess_fraction", low=0.0, high=1.0, high_inclusive=True)
        if self.grad_clip is not None:
            self.grad_clip = _number(self, "grad_clip", low=0.0)
        betas = self.adam_betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas):
            raise InputError(f"trainer setting 'adam_betas' must be two numbers in [0, 1), got {betas!r}")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(f"trainer setting 'lr_schedule' must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.num_threads is not None and self.num_threads != "auto":
            self.num_threads = _integer(self, "num_threads", minimum=1)
        if not isinstance(self.device, str) or not self.device:
            raise InputError(f"trainer setting 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("progress", "tensorboard", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"trainer setting {name!r} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, settings: dict[str, Any], where: str = "trainer") -> "TrainerConfig":
        """Build from a recipe's dict; unknown keys and bad values raise an
        :class:`~energyflow.errors.InputError` that names the recipe node ``where``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InputError(f"{where}: unknown trainer setting(s) {unknown}; valid: {sorted(known)}")
        try:
            return cls(**settings)
        except InputError as err:
            raise InputError(f"{where}: {err}") from None

    def result_fields(self) -> dict[str, Any]:
        """The settings that change the trained weights (what a resumed checkpoint must match)."""
        return {k: v for k, v in asdict(self).items() if k not in _NON_RESULT_FIELDS}


_NON_RESULT_FIELDS = frozenset({"device", "num_threads", "log_every", "eval_every", "checkpoint_every", "progress",
                                "tensorboard", "resume", "min_ess_fraction"})


def _integer(config: Any, name: str, minimum: Optional[int]) -> int:
    return check_integer(getattr(config, name), f"trainer setting {name!r}", minimum)


def _number(config: Any, name: str, low: float, high: Optional[float] = None, low_inclusive: bool = True,
            high_inclusive: bool = False) -> float:
    return check_number(getattr(config, name), f"trainer setting {name!r}", low, high, low_inclusive, high_inclusive)


@dataclass
class TrainResult:
    """``step`` reached, final ``metrics`` (averaged over the last logging window) and wall ``seconds``."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Trainer:
    """Fit ``model`` with ``objective`` on ``data``.

    Args:
        model: the network ``net(x, t, cond)`` (or any module the objective calls).
        objective: an :class:`~energyflow.losses.Objective`: the trainer calls its ``prepare`` on the
            global batch (noise, times), checks its ``group_size`` against each rank's slice, and
            passes the EMA network as ``target=`` when it declares ``uses_target``.
        data: a batch source (``sample(batch_size, generator) -> dict``).
        config: a :class:`TrainerConfig` (or a dict of its fields).
        out_dir: where checkpoints and logs go (``None``: nothing is written).
        hooks: evaluation hooks run every ``config.eval_every`` steps and at the end.
        name: metric namespace for training metrics (``train/loss``…).
    """

    def __init__(self, model: nn.Module, objective: Callable[..., Any], data: BatchSource,
                 config: TrainerConfig | dict | None = None, out_dir: Optional[str] = None,
                 hooks: Sequence[EvalHook] = (), name: str = "train"):
        if isinstance(config, dict):
            config = TrainerConfig.from_dict(config)
        self.config = config or TrainerConfig()
        c = self.config
        self.device = resolve_device(c.device)
        set_threads(c.num_threads)
        self.dist: DistInfo = init_distributed(self.device)
        if c.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {c.batch_size} must be divisible by the world size {self.dist.world_size}")
        from .losses import Objective

        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an energyflow.losses.Objective (declaring group_size, uses_target and "
                            f"prepare), got {type(objective).__name__}")
        group = objective.group_size or 1
        if (c.batch_size // self.dist.world_size) % group:
            raise ValueError(f"each rank's batch ({c.batch_size // self.dist.world_size}) must hold whole groups of {group}")
        self.model = model.to(self.device)
        self.objective, self.data, self.out_dir, self.hooks, self.name = objective, data, out_dir, list(hooks), name
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # the fused kernel (one pass over all parameters) where torch has one: on CPU it is ~8x
        # faster than the per-parameter loop, which cost ~15 % of a small MLP's training step
        params = list(self.model.parameters())
        fused = self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay,
                                           betas=tuple(c.adam_betas), fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if c.ema_decay > 0:
            self.ema_model: nn.Module = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(c.ema_decay),
                                                      use_buffers=True)
        else:
            self.ema_model = self.model
        self.data_generator = torch.Generator().manual_seed(c.seed)
        self.noise_generator = torch.Generator().manual_seed(c.seed + 1)
        self.step = 0
        self.logger: Optional[MetricLogger] = None
        self._ess_warned = False

    # -- helpers -------------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        c = self.config
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        if c.lr_schedule == "cosine":
            progress = min(1.0, step / max(1, c.steps))
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        if c.lr_schedule != "constant":
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {c.lr_schedule!r}")
        return warm

    @property
    def ema_module(self) -> nn.Module:
        """The EMA network (use it for sampling and evaluation)."""
        return self.ema_model.module if isinstance(self.ema_model, AveragedModel) else self.ema_model

    def _local_slice(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's contiguous slice of every tensor of the global batch (``cond`` may be a dict of
        tensors), moved to the device; anything else in a batch is refused."""
        world, rank = self.dist.world_size, self.dist.rank

        def local(key: str, v: Any) -> Any:
            if isinstance(v, Tensor):
                if v.dim() == 0:
                    raise InputError(f"batch entry {key!r} is a 0-d tensor; batch tensors have the batch as first dimension")
                n = v.shape[0] // world
                v = v[rank * n:(rank + 1) * n] if world > 1 else v
                return v.to(self.device, non_blocking=True)
            if isinstance(v, dict):
                return {k: local(f"{key}.{k}", u) for k, u in v.items()}
            if v is None:
                return None
            raise InputError(f"batch entry {key!r} is a {type(v).__name__}; a batch holds tensors, or dicts of tensors "
                             f"(its first dimension is split across data-parallel ranks)")

        return {k: local(k, v) for k, v in batch.items()}

    def _reduce_metrics(self, sums: dict[str, Any], count: int) -> dict[str, float]:
        """Window means of the metrics, averaged over ranks: the only host synchronisation of a window."""
        keys = sorted(sums)
        vals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device).reshape(())
                            for k in keys]) / max(count, 1)
        if self.dist.enabled:
            dist.all_reduce(vals)
            vals = vals / self.dist.world_size
        vals = vals.cpu()
        return {f"{self.name}/{k}": float(v) for k, v in zip(keys, vals)}

    def _rank_weight_diff(self) -> float:
        """The largest |w_rank − w_rank0| over all weights and ranks (0 when data parallelism kept the
        replicas identical, as it must); logged at the end of a data-parallel fit."""
        diff = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.model.parameters():
            ref = p.detach().clone()
            dist.broadcast(ref, src=0)
            diff = torch.maximum(diff, (p.detach() - ref).abs().max().to(torch.float64))
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)

    def _check_ess(self, metrics: dict[str, float]) -> None:
        """Warn once when the window's mean ESS fraction is below ``config.min_ess_fraction``."""
        frac = metrics.get(f"{self.name}/ess_fraction")
        threshold = self.config.min_ess_fraction
        if frac is None or not threshold or frac >= threshold:
            return
        metrics[f"{self.name}/ess_warning"] = 1.0
        if not self._ess_warned and self.dist.is_main:
            self._ess_warned = True
            print(f"warning: {self.name} at step {self.step}: the energy weights' effective sample size is "
                  f"{frac:.2%} of the batch (< {threshold:.0%}): a few samples carry each batch, so the fit to the "
                  f"tilted target is unreliable. Lower beta, raise the batch size, or tilt iteratively "
                  f"(energyflow.iterative).", file=sys.stderr, flush=True)

    # -- checkpoints ---------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.out_dir, CHECKPOINT) if self.out_dir else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema_model.state_dict() if self.ema_model is not self.model else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_generator": self.data_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if state.get("ema") is not None and self.ema_model is not self.model:
            self.ema_model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_generator.set_state(state["data_generator"])
        self.noise_generator.set_state(state["noise_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Continue from another run's optimiser (``trainer.optimizer.state_dict()`` of a model with
        the same parameters): its moment estimates and step counts are loaded, while this trainer's
        own settings (learning rate and schedule, betas, weight decay) are kept.  Used to run one
        optimiser across the rounds of iterative training.

        Raises:
            ValueError: the state belongs to other parameters (other shapes or count)."""
        keep = [{k: g[k] for k in ("lr", "initial_lr", "betas", "weight_decay") if k in g}
                for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"the optimizer state does not fit this model's parameters ({err})") from None
        for group, settings in zip(self.optimizer.param_groups, keep):
            group.update(settings)

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (main process only)."""
        if self.checkpoint_path and self.dist.is_main:
            atomic_torch_save(self.state_dict(), self.checkpoint_path)

    def maybe_resume(self) -> bool:
        """Load ``checkpoint.pt`` if it exists and ``config.resume``; return whether it did."""
        path = self.checkpoint_path
        if not (self.config.resume and path and os.path.exists(path)):
            return False
        # On the CPU: generator states must stay CPU ByteTensors; load_state_dict moves the rest.
        state = load_torch(path, what="trainer checkpoint", map_location="cpu")
        if not isinstance(state, dict) or not {"step", "model", "optimizer", "config"} <= set(state):
            raise CorruptFileError(f"trainer checkpoint {path} lacks the step, model, optimizer or config entries")
        stored = TrainerConfig.from_dict(state["config"], where=f"config stored in {path}").result_fields()
        current = self.config.result_fields()
        changed = sorted(k for k in current if stored.get(k) != current[k])
        if changed:
            detail = ", ".join(f"{k}: {stored.get(k)!r} -> {current[k]!r}" for k in changed)
            raise InputError(f"refusing to resume from {path}: it was trained with other settings ({detail}); "
                             f"use another output folder or delete the checkpoint")
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as err:
            raise CorruptFileError(f"trainer checkpoint {path} does not fit this model or optimiser "
                                   f"({str(err).splitlines()[0][:200]})") from None
        return True

    # -- the loop ------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimisation step on the next global batch; returns this rank's metrics."""
        c = self.config
        batch = self.data.sample(c.batch_size, self.data_generator)
        batch = self.objective.prepare(batch, self.noise_generator)
        local = self._local_slice(batch)
        self.train_model.train()
        if self.objective.uses_target:
            out = self.objective(self.train_model, local, target=self.ema_module)
        else:
            out = self.objective(self.train_model, local)
        if not torch.isfinite(out.loss.detach()):
            raise FloatingPointError(f"non-finite loss {out.loss.item()} at step {self.step}; metrics {out.metrics}")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        metrics = dict(out.metrics)
        if c.grad_clip:
            metrics["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip).detach()
        self.optimizer.step()
        self.scheduler.step()
        if self.ema_model is not self.model:
            self.ema_model.update_parameters(self.model)
        self.step += 1
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Run the hooks (main process) and log their metrics under ``eval/``."""
        results: dict[str, float] = {}
        if self.dist.is_main:
            for hook in self.hooks:
                results.update({f"eval/{k}": float(v) for k, v in hook(self).items()})
            if self.logger is not None and results:
                self.logger.log(self.step, results)
        return results

    def fit(self) -> TrainResult:
        """Train to ``config.steps`` (resuming if possible); always ends with a checkpoint."""
        from tqdm.auto import tqdm

        c = self.config
        resumed = self.maybe_resume()
        if resumed and self.dist.is_main:
            print(f"resumed from {self.checkpoint_path} at step {self.step}")
        if self.out_dir and self.dist.is_main:
            self.logger = MetricLogger(self.out_dir, tensorboard=c.tensorboard, resume_step=self.step)
        bar = tqdm(total=c.steps, initial=self.step, desc=self.name, disable=not (c.progress and self.dist.is_main),
                   dynamic_ncols=True, leave=False, mininterval=0.1 if sys.stderr.isatty() else 10.0)
        sums: dict[str, Any] = {}
        count, last, start = 0, {}, time.perf_counter()
        stop = _StopRequest()
        in_step = False
        try:
            with stop.installed():
                while self.step < c.steps:
                    t0 = time.perf_counter()
                    in_step = True
                    metrics = self.train_step()
                    in_step = False
                    metrics["step_seconds"] = time.perf_counter() - t0
                    for k, v in metrics.items():
                        sums[k] = sums[k] + v if k in sums else v
                    count += 1
                    bar.update(1)
                    if self.step % c.log_every == 0 or self.step == c.steps:
                        last = self._reduce_metrics(sums, count)
                        last[f"{self.name}/lr"] = self.scheduler.get_last_lr()[0]
                        sums, count = {}, 0
                        self._check_ess(last)
                        if self.logger is not None:
                            self.logger.log(self.step, last)
                        bar.set_postfix(loss=f"{last.get(f'{self.name}/loss', float('nan')):.4g}")
                    if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                        self.evaluate()
                    if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                        self.save_checkpoint()
                    if stop.agreed(self.dist, self.device):  # a step boundary: the checkpoint is exact
                        self.save_checkpoint()
                        raise KeyboardInterrupt(f"signal {stop.signum}")
                self.save_checkpoint()
                if stop.signum is not None:  # asked to stop during the last step: the run is complete
                    raise KeyboardInterrupt(f"signal {stop.signum}")
        except KeyboardInterrupt:
            if stop.signum is None and not in_step:
                # raised at a step boundary (e.g. by an evaluation hook): the state is whole, save it
                self.save_checkpoint()
            saved = self.checkpoint_path and not in_step
            if self.dist.is_main:
                where = "checkpoint saved" if saved else "the last checkpoint stays"
                print(f"\ninterrupted at step {self.step} ({where}); rerun to resume", file=sys.stderr)
            raise
        finally:
            bar.close()
            if self.logger is not None and stop.signum is not None:
                self.logger.close()
                self.logger = None
        if self.dist.enabled:
            last[f"{self.name}/rank_weight_diff"] = self._rank_weight_diff()
            if self.logger is not None:
                self.logger.log(self.step, {f"{self.name}/rank_weight_diff": last[f"{self.name}/rank_weight_diff"]})
        if self.hooks:
            last.update(self.evaluate())
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        return TrainResult(step=self.step, metrics=last, seconds=time.perf_counter() - start)


class _StopRequest:
    """SIGINT / SIGTERM handling for the training loop.

    The first signal only sets a flag: the loop finishes the step it is in, writes a checkpoint at
    that step boundary and stops, so resuming is exactly the uninterrupted run (as after a hard
    kill at a checkpoint).  A second signal interrupts at once (the last checkpoint stays valid).
    Under data parallelism the ranks agree on the flag every step (one tiny all-reduce), so they
    all stop at the same step.  Handlers are installed only in the main thread.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.signum = signum
        print(f"\nsignal {signum}: stopping after this step (again to stop at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                break
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def agreed(self, info: DistInfo, device: torch.device) -> bool:
        """Whether any rank has been asked to stop."""
        if not info.enabled:
            return self.signum is not None
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signum is None:
            self.signum = signal.SIGTERM
        return bool(flag.item() > 0)
