"""Speed of energy-weighted flow matching against its baselines, measured side by side in one run.

1. Training step time: EFM (energy evaluated on every batch, log-space softmax weights) vs plain
   flow matching, same network, same batch.  Goal: ratio ≤ 1.05.
2. Sampling time per sample: EFM-OT (Euler, N steps, no gradient) vs QGPO-style guidance
   (the same base network plus a time-dependent energy network and its input gradient at every
   step), equal step count.  Goal: EFM ≥ 2× faster.

usage: python benchmarks/toy_speed.py [--hidden 256] [--batch 1024] [--steps 50] [--device auto]
Timings are medians over interleaved repetitions (A, B, A, B, …), so drift affects both equally.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from domains.toy.datasets import sample_toy
from domains.toy.energies import SineEnergy
from energyflow.guidance import CEPGuidedPredictor
from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss
from energyflow.nets import MLPEnergyNet, MLPField
from energyflow.paths import CondOTPath
from energyflow.predictor import Predictor
from energyflow.runtime import resolve_device
from energyflow.samplers import ODESampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(hidden: int, batch: int, iters: int, reps: int, device: torch.device) -> dict[str, float]:
    path = CondOTPath()
    objectives = {"fm": FlowMatchingLoss(path), "efm": EnergyWeightedLoss(path, beta=3.0, energy=SineEnergy(0.3, 1.0, 0.1))}
    setups = {}
    for name, objective in objectives.items():
        torch.manual_seed(0)
        net = MLPField(2, hidden=hidden, depth=3).to(device)
        setups[name] = (net, objective, torch.optim.AdamW(net.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(0)

    def run(name: str) -> float:
        net, objective, opt = setups[name]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            batch = objective.prepare({"x1": sample_toy("8gaussians", batch_size, g)}, g)  # as the trainer does
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss = objective(net, batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        return (time.perf_counter() - t0) / iters

    batch_size = batch
    for name in setups:  # warm-up
        run(name)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(reps):
        for name in setups:
            times[name].append(run(name))
    return {name: statistics.median(v) for name, v in times.items()}


def time_sampling(hidden: int, n: int, steps: int, reps: int, device: torch.device) -> dict[str, float]:
    path = CondOTPath()
    torch.manual_seed(0)
    efm = Predictor(MLPField(2, hidden=hidden, depth=3).to(device).eval(), path)
    base = Predictor(MLPField(2, hidden=hidden, depth=3).to(device).eval(), path)
    qgpo = CEPGuidedPredictor(base, MLPEnergyNet(2, hidden=hidden, depth=3).to(device).eval(), scale=1.0)
    sampler = ODESampler("euler", steps)
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)).to(device)

    def run(predictor) -> float:
        _sync(device)
        t0 = time.perf_counter()
        sampler.sample(predictor, x0)
        _sync(device)
        return (time.perf_counter() - t0) / n

    models = {"efm_ot": efm, "qgpo": qgpo}
    for p in models.values():
        run(p)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(reps):
        for k, p in models.items():
            times[k].append(run(p))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (default 256)")
    parser.add_argument("--batch", type=int, default=1024, help="training batch (default 1024)")
    parser.add_argument("--train-iters", type=int, default=30, help="steps per timing (default 30)")
    parser.add_argument("--samples", type=int, default=2048, help="samples per sampling timing (default 2048)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps N (default 50)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions (default 7)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device: {device}  hidden: {args.hidden}  batch: {args.batch}  sampler: Euler, {args.steps} steps")

    tr = time_training(args.hidden, args.batch, args.train_iters, args.reps, device)
    ratio = tr["efm"] / tr["fm"]
    print(f"training step   plain FM {tr['fm'] * 1e3:8.3f} ms   EFM {tr['efm'] * 1e3:8.3f} ms   "
          f"EFM/FM = {ratio:.3f}  (goal <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")

    sm = time_sampling(args.hidden, args.samples, args.steps, args.reps, device)
    speedup = sm["qgpo"] / sm["efm_ot"]
    print(f"sampling/sample EFM-OT {sm['efm_ot'] * 1e6:8.2f} us   QGPO guidance {sm['qgpo'] * 1e6:8.2f} us   "
          f"QGPO/EFM = {speedup:.2f}x  (goal >= 2x: {'met' if speedup >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
