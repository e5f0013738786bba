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

import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .data import BatchSource
from .runtime import DistInfo, atomic_torch_save, init_distributed, resolve_device, seed_everything, set_threads
from .tracking import MetricLogger

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
        num_threads: torch intra-op threads (``None``: torch's default).
        log_every, eval_every, checkpoint_every: periods in steps (0 disables eval/checkpoints;
            a final checkpoint is always written).
        progress: show a tqdm progress bar (main process only).
        tensorboard: also write tensorboard event files.
        resume: continue from ``<out_dir>/checkpoint.pt`` when it exists.
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
        objective: ``objective(net, batch) -> LossOutput``; if it has ``prepare(batch, generator)``
            the trainer calls it on the global batch to draw noise and times.
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
            config = TrainerConfig(**config)
        self.config = config or TrainerConfig()
        c = self.config
        set_threads(c.num_threads)
        self.device = resolve_device(c.device)
        self.dist: DistInfo = init_distributed(self.device)
        if c.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {c.batch_size} must be divisible by the world size {self.dist.world_size}")
        group = getattr(objective, "group_size", None) or 1
        if (c.batch_size // self.dist.world_size) % group:
            raise ValueError(f"each rank's batch ({c.batch_size // self.dist.world_size}) must hold whole groups of {group}")
        self.model = model.to(self.device)
        self.objective, self.data, self.out_dir, self.hooks, self.name = objective, data, out_dir, list(hooks), name
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                           betas=tuple(c.adam_betas))
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
        world, rank = self.dist.world_size, self.dist.rank
        out = {}
        for k, v in batch.items():
            if isinstance(v, Tensor):
                n = v.shape[0] // world
                v = v[rank * n:(rank + 1) * n] if world > 1 else v
                v = v.to(self.device, non_blocking=True)
            out[k] = v
        return out

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
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.load_state_dict(state)
        return True

    # -- the loop ------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimisation step on the next global batch; returns this rank's metrics."""
        c = self.config
        batch = self.data.sample(c.batch_size, self.data_generator)
        prepare = getattr(self.objective, "prepare", None)
        if prepare is not None:
            batch = prepare(batch, self.noise_generator)
        local = self._local_slice(batch)
        self.train_model.train()
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
        if self.maybe_resume() and self.dist.is_main:
            print(f"resumed from {self.checkpoint_path} at step {self.step}")
        if self.out_dir and self.dist.is_main:
            self.logger = MetricLogger(self.out_dir, tensorboard=c.tensorboard)
        bar = tqdm(total=c.steps, initial=self.step, desc=self.name, disable=not (c.progress and self.dist.is_main),
                   dynamic_ncols=True, leave=False, mininterval=0.1 if sys.stderr.isatty() else 10.0)
        sums: dict[str, Any] = {}
        count, last, start = 0, {}, time.perf_counter()
        previous_handler = _install_sigterm_handler()
        try:
            while self.step < c.steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                metrics["step_seconds"] = time.perf_counter() - t0
                for k, v in metrics.items():
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    last = self._reduce_metrics(sums, count)
                    last[f"{self.name}/lr"] = self.scheduler.get_last_lr()[0]
                    sums, count = {}, 0
                    if self.logger is not None:
                        self.logger.log(self.step, last)
                    bar.set_postfix(loss=f"{last.get(f'{self.name}/loss', float('nan')):.4g}")
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    self.evaluate()
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            self.save_checkpoint()
            if self.dist.is_main:
                print(f"\ninterrupted at step {self.step}: checkpoint saved, rerun to resume")
            raise
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        self.save_checkpoint()
        if self.hooks:
            last.update(self.evaluate())
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        return TrainResult(step=self.step, metrics=last, seconds=time.perf_counter() - start)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _install_sigterm_handler():
    """Turn SIGTERM into KeyboardInterrupt (so a killed job checkpoints); main thread only."""
    try:
        return signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:  # not the main thread
        return None
