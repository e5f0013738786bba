"""Train a tiny toy model; used by test_trainer.py in subprocesses (torchrun, crash and resume).

usage: python _toy_train.py OUT_DIR STEPS [--crash-at K] [--weighted]
Writes OUT_DIR/rank<r>.pt (final weights) on every rank and the trainer's metrics.jsonl on rank 0.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from domains.toy.datasets import sample_toy  # noqa: E402
from domains.toy.energies import SineEnergy  # noqa: E402
from energyflow.data import FunctionBatchSource  # noqa: E402
from energyflow.losses import EnergyWeightedLoss  # noqa: E402
from energyflow.nets import MLPField  # noqa: E402
from energyflow.paths import CondOTPath  # noqa: E402
from energyflow.trainer import Trainer, TrainerConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("steps", type=int)
    p.add_argument("--crash-at", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = MLPField(2, hidden=32, depth=2)
    objective = EnergyWeightedLoss(CondOTPath(), beta=3.0, energy=SineEnergy(0.3, 1.0, 0.1))
    data = FunctionBatchSource(lambda n, g: sample_toy("8gaussians", n, g))

    def crash(trainer: Trainer) -> dict:
        if args.crash_at and trainer.step == args.crash_at:
            os._exit(3)  # a hard kill: no cleanup, no final checkpoint
        return {}

    config = TrainerConfig(steps=args.steps, batch_size=256, lr=1e-3, ema_decay=0.9, log_every=1,
                           checkpoint_every=args.checkpoint_every, eval_every=1 if args.crash_at else 0,
                           progress=False, tensorboard=False, device="cpu", seed=0)
    trainer = Trainer(net, objective, data, config, out_dir=args.out_dir, hooks=[crash])
    trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema_module.state_dict()},
               os.path.join(args.out_dir, f"rank{trainer.dist.rank}.pt"))


if __name__ == "__main__":
    main()
