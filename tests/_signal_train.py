"""Train a tiny weighted toy model; the process may send itself SIGINT/SIGTERM in the middle of a step.

usage: python _signal_train.py OUT_DIR STEPS [--signal-at K] [--signal TERM|INT]
Writes OUT_DIR/final.pt (model, EMA and optimiser state) when training completes.
"""
import argparse
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from energyflow.data import FunctionBatchSource  # noqa: E402
from energyflow.energies import FunctionEnergy  # noqa: E402
from energyflow.losses import EnergyWeightedLoss  # noqa: E402
from energyflow.nets import MLPField  # noqa: E402
from energyflow.paths import CondOTPath  # noqa: E402
from energyflow.trainer import Trainer, TrainerConfig  # noqa: E402


class SignalMidStep(EnergyWeightedLoss):
    """The energy-weighted loss, which on its ``at``-th call signals its own process *inside* the step
    (after the forward pass has started, before backward and the optimiser update)."""

    def __init__(self, *args, at: int = 0, signum: int = signal.SIGTERM, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.at, self.signum = 0, at, signum

    def __call__(self, net, batch):
        out = super().__call__(net, batch)
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("steps", type=int)
    p.add_argument("--signal-at", type=int, default=0)
    p.add_argument("--signal", choices=["TERM", "INT"], default="TERM")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = MLPField(2, hidden=32, depth=2)
    signum = signal.SIGTERM if args.signal == "TERM" else signal.SIGINT
    objective = SignalMidStep(CondOTPath(), beta=2.0, energy=FunctionEnergy(lambda x: x[:, 0]),
                              at=args.signal_at, signum=signum)
    data = FunctionBatchSource(lambda n, g: torch.randn(n, 2, generator=g) * 0.5 + 1.0)
    config = TrainerConfig(steps=args.steps, batch_size=128, lr=1e-3, ema_decay=0.9, log_every=5,
                           checkpoint_every=1000, progress=False, tensorboard=False, device="cpu", seed=0)
    trainer = Trainer(net, objective, data, config, out_dir=args.out_dir)
    trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema_module.state_dict(),
                "optimizer": trainer.optimizer.state_dict()["state"]}, os.path.join(args.out_dir, "final.pt"))


if __name__ == "__main__":
    main()
