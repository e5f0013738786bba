"""Action-sampling time per state: QIPO-OT and QIPO-Diff against QGPO, at their default step counts,
measured side by side in one run (Walker2d sizes: 17-d states, 6-d actions, MLPs 128×3 as in the recipe).

QIPO-OT: Euler, 10 steps, no gradient.  QIPO one-step (algo=qipo_onestep): the distilled policy,
one Euler step, i.e. one network evaluation per action.  QIPO-Diff: DPM-Solver, 15 steps.  QGPO: the same VP
behaviour model and DPM-Solver steps, plus a time-dependent energy network whose input gradient
is added at every step (one forward and one backward pass more per step).

``--ot-steps 5`` also times QIPO-OT at fewer Euler steps (a trained QIPO-OT policy is nearly
deterministic and its flow nearly straight; docs/qipo.md gives its score at 5 vs 10 steps).

usage: python benchmarks/rl_sampling.py [--states 256] [--reps 7] [--device auto] [--ot-steps 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from domains.rl.policy import GenerativePolicy
from energyflow.guidance import CEPGuidedPredictor
from energyflow.nets import MLPEnergyNet
from energyflow.runtime import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--states", type=int, default=256, help="states per call (a vectorised evaluation batch)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--hidden", type=int, default=128, help="policy and QGPO energy-net width (recipe default 128)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ot-steps", type=int, nargs="*", default=[], help="extra Euler step counts for QIPO-OT")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    ot = GenerativePolicy(17, 6, "ot", hidden=args.hidden).to(device).eval()
    vp = GenerativePolicy(17, 6, "vp", hidden=args.hidden).to(device).eval()
    energy = MLPEnergyNet(6, hidden=args.hidden, depth=3, cond_dim=17).to(device).eval()
    qgpo = CEPGuidedPredictor(vp.predictor(), energy, scale=1.0)
    obs = torch.randn(args.states, 17, device=device)
    onestep = GenerativePolicy(17, 6, "ot", hidden=args.hidden, sampler={"name": "euler", "steps": 1}).to(device).eval()
    runs = {"qipo_ot": lambda: ot.act(obs), "qipo_diff": lambda: vp.act(obs), "qgpo": lambda: vp.act(obs, predictor=qgpo),
            "qipo_onestep": lambda: onestep.act(obs)}
    for n in args.ot_steps:
        runs[f"qipo_ot@{n}"] = lambda n=n: ot.act(obs, sampler={"steps": n})
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(args.reps):
        for k, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) / args.states)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device: {device}  states per call: {args.states}")
    for k in runs:
        print(f"{k:12s} {med[k] * 1e6:9.1f} us per state   QGPO/{k} = {med['qgpo'] / med[k]:.2f}x")
    print(f"QIPO-OT vs QGPO: {100 * (1 - med['qipo_ot'] / med['qgpo']):.0f}% less time (goal: >= 5x faster)")
    print(f"QIPO one-step vs QGPO: {med['qgpo'] / med['qipo_onestep']:.1f}x faster per state (goal: >= 30x)")


if __name__ == "__main__":
    main()
