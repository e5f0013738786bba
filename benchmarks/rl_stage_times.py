"""Where the main job's time goes: each stage of ``energyflow run recipes/qipo_walker.yaml``
(QIPO-OT, CPU scale) timed on a slice of its work and projected to the recipe's full size, for the
previous code paths against the current ones and on 1 vs 2 threads, side by side in one run.

Stages and their size in the recipe (``recipes/scale/cpu.yaml``):

* behaviour: 20 000 flow-matching steps, batch 256, policy MLP 128 × 3;
* critic support: 16 actions of μ (Euler, 10 steps) for each of 50 000 next states;
* critic: 25 000 in-support Q-learning steps, batch 256, twin 256 × 2 critic, target on 256 × 16 actions;
* rounds: 4 renewals, each 16 actions for 32 000 states, then 1 000 policy steps at batch 1 024.

``before`` is the code path of the session that filed the speed issue: AdamW's per-parameter loop
(now one fused kernel) and sampling that recomputes the state's embedding for every sample and
solver step (now ``MLPField.bind``, once per state).  The data are random Walker2d-sized arrays
(200 000 transitions; timings do not depend on the values).  Each measurement is the median of
``--reps`` interleaved repetitions.  Ratios are what to quote: absolute times vary ~2x between machines.

usage: python benchmarks/rl_stage_times.py [--threads 1 2] [--reps 3] [--scale 1.0]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from domains.rl.critic import InSupportCriticLoss, TwinQ
from domains.rl.policy import GenerativePolicy
from energyflow.data import TensorBatchSource
from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss
from energyflow.trainer import Trainer, TrainerConfig

OBS, ACT, M = 17, 6, 16
RECIPE = {"behaviour_steps": 20_000, "critic_states": 50_000, "critic_steps": 25_000, "rounds": 4,
          "round_states": 32_000, "round_steps": 1_000}


def _trainer(model, objective, tensors, batch, ema, clip, before, group=None):
    cfg = TrainerConfig(steps=10**9, batch_size=batch, lr=3e-4, ema_decay=ema, grad_clip=clip, progress=False,
                        tensorboard=False, log_every=10**9, checkpoint_every=0, device="cpu")
    tr = Trainer(model, objective, TensorBatchSource(tensors, group_size=group), cfg)
    if before:  # the previous optimiser: AdamW's per-parameter loop
        tr.optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=False)
        tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, tr._lr_factor)
    return tr


def _steps(tr: Trainer, n: int) -> float:
    """Seconds per step of ``n`` trainer steps (``train_step``: batch, loss, backward, clipping,
    optimiser and EMA; after two warm-up steps)."""
    for _ in range(2):
        tr.train_step()
    start = time.perf_counter()
    for _ in range(n):
        tr.train_step()
    return (time.perf_counter() - start) / n


def _sample(policy: GenerativePolicy, obs: torch.Tensor, before: bool) -> float:
    """Seconds per state to draw M actions for each of ``obs``."""
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    if before:  # the previous path: the state repeated M times through the whole field at every step
        policy.sample(obs, M, g, predictor=policy.predictor())
    else:
        policy.sample(obs, M, g)
    return (time.perf_counter() - start) / obs.shape[0]


def measure(threads: int, before: bool, scale: float) -> dict[str, float]:
    """Projected seconds of each stage of the recipe."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = 200_000
    obs, act = torch.randn(n, OBS), torch.rand(n, ACT) * 2 - 1
    pol = GenerativePolicy(OBS, ACT, "ot", 128, 3)
    k = max(1, int(300 * scale))
    beh = _trainer(pol, FlowMatchingLoss(pol.path), {"x1": act, "cond": obs}, 256, 0.999, 1.0, before)
    out = {"behaviour": _steps(beh, k) * RECIPE["behaviour_steps"]}
    states = obs[:max(256, int(4096 * scale))]
    out["critic support"] = _sample(pol.eval(), states, before) * RECIPE["critic_states"]
    c = 50_000
    crit = TwinQ(OBS, ACT, 256, 2)
    tensors = {"x1": act[:c], "obs": obs[:c], "next_obs": obs[:c], "reward": torch.randn(c), "terminal": torch.zeros(c),
               "support": torch.rand(c, M, ACT) * 2 - 1}
    ctr = _trainer(crit, InSupportCriticLoss(0.99, 0.1), tensors, 256, 0.995, None, before)
    out["critic"] = _steps(ctr, max(1, int(150 * scale))) * RECIPE["critic_steps"]
    renew = _sample(pol.eval(), states, before) * RECIPE["round_states"]
    g_obs = obs[:4096].unsqueeze(1).expand(-1, M, -1)
    tensors = {"x1": (torch.rand(4096, M, ACT) * 2 - 1), "cond": g_obs, "energy": torch.randn(4096, M)}
    rtr = _trainer(pol.train(), EnergyWeightedLoss(pol.path, 1.0, group_size=M), tensors, 1024, 0.0, 1.0, before,
                   group=M)
    out["rounds"] = RECIPE["rounds"] * (renew + _steps(rtr, max(1, int(100 * scale))) * RECIPE["round_steps"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the default slice sizes (tests use 0.05)")
    args = p.parse_args()
    configs = [("before", 1, True)] + [(f"now@{t}", t, False) for t in args.threads] + \
              [(f"before@{t}", t, True) for t in args.threads if t != 1]
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for _ in range(args.reps):  # interleaved, so drifts in machine load hit every configuration alike
        for name, threads, before in configs:
            samples[name].append(measure(threads, before, args.scale))
    stages = list(samples[configs[0][0]][0])
    med = {name: {s: statistics.median(r[s] for r in runs) for s in stages} for name, runs in samples.items()}
    for name in med:
        med[name]["total"] = sum(med[name][s] for s in stages)
    names = list(med)
    print("projected seconds per stage of the main job (QIPO-OT, recipe sizes); 'before' = previous code, 1 thread")
    print(f"{'stage':16s}" + "".join(f"{n:>12s}" for n in names) + "".join(f"{'before/' + n:>18s}" for n in names[1:]))
    for s in stages + ["total"]:
        row = "".join(f"{med[n][s]:12.1f}" for n in names)
        ratios = "".join(f"{med['before'][s] / med[n][s]:17.2f}x" for n in names[1:])
        print(f"{s:16s}{row}{ratios}")


if __name__ == "__main__":
    main()
