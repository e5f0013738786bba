"""Image-domain speed, measured side by side in one run (the figures the image issue asks for):

1. the training-step time of EFM against plain flow matching on the same UNet and batch (EFM only
   adds the batch's softmax weights over precomputed energies: goal ratio <= 1.05);
2. the sampling time per image of EFM against classifier guidance at equal NFE (guidance adds a
   backward pass through the classifier and the UNet at every network call), and of CFG (a
   doubled batch per call).

A and B alternate within every repetition, so drifts of the machine's speed hit both; the
medians and their ratio are printed.  Networks are untrained (time does not depend on weights).

usage: python benchmarks/image_speed.py [--preset cpu] [--shape 1 8 8] [--batch 128] [--reps 20]
                                        [--samples 256] [--steps 10] [--device auto] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from domains.image.energies import ClassifierEnergy
    from energyflow.guidance import ClassifierFreeGuidancePredictor, EnergyGuidedPredictor
    from energyflow.image_nets import ConvClassifier, UNetField, unet_preset
    from energyflow.losses import EnergyWeightedLoss, FlowMatchingLoss
    from energyflow.paths import CondOTPath
    from energyflow.predictor import Predictor
    from energyflow.runtime import resolve_device
    from energyflow.sampling import initial_noise, sampler_from_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--shape", type=int, nargs=3, default=[1, 8, 8], metavar=("C", "H", "W"))
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--reps", type=int, default=20, help="timed training steps per method")
    p.add_argument("--samples", type=int, default=256, help="images per sampling call")
    p.add_argument("--steps", type=int, default=10, help="Heun steps (NFE = 2 x steps)")
    p.add_argument("--sample-reps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    shape = tuple(args.shape)
    path = CondOTPath()
    torch.manual_seed(0)

    # -- 1. training step: EFM vs FM ---------------------------------------------------------------
    net = UNetField(**unet_preset(args.preset, list(shape))).to(device)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(args.batch, *shape, generator=g).to(device)
    energies = torch.randn(args.batch, generator=g).to(device)
    fm, efm = FlowMatchingLoss(path), EnergyWeightedLoss(path, beta=3.0)

    def step(objective, batch) -> float:
        _sync(device)
        start = time.perf_counter()
        batch = objective.prepare(dict(batch), g)
        loss = objective(net, batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - start

    for _ in range(3):  # warm-up
        step(fm, {"x1": x1})
        step(efm, {"x1": x1, "energy": energies})
    t_fm, t_efm = [], []
    for _ in range(args.reps):
        t_fm.append(step(fm, {"x1": x1}))
        t_efm.append(step(efm, {"x1": x1, "energy": energies}))
    fm_s, efm_s = statistics.median(t_fm), statistics.median(t_efm)

    # -- 2. sampling: EFM (plain ODE) vs classifier guidance vs CFG, equal NFE ----------------------
    net.eval()
    cond_net = UNetField(**unet_preset(args.preset, list(shape), num_classes=10)).to(device).eval()
    classifier = ConvClassifier(list(shape), 10).to(device).eval()
    sampler = sampler_from_config({"name": "heun", "steps": args.steps})
    x0 = initial_noise(args.samples, shape, seed=0, device=device)
    labels = torch.full((args.samples,), 3, dtype=torch.long, device=device)
    methods = {
        "efm": (Predictor(net, path, x1_clip=1.0), None),
        "classifier_guidance": (EnergyGuidedPredictor(Predictor(net, path, x1_clip=1.0), ClassifierEnergy(classifier, [3]),
                                                      beta=3.0, at="x1", min_time=0.1), None),
        "cfg": (ClassifierFreeGuidancePredictor(Predictor(cond_net, path, x1_clip=1.0), 3.0), labels),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    nfe = {}
    for rep in range(args.sample_reps + 1):
        for name, (predictor, cond) in methods.items():
            _sync(device)
            start = time.perf_counter()
            res = sampler.sample(predictor, x0, cond)
            _sync(device)
            if rep:  # the first round warms up
                times[name].append((time.perf_counter() - start) / args.samples)
            nfe[name] = res.nfe
    med = {m: statistics.median(v) for m, v in times.items()}

    print(f"device {device}, threads {args.threads}, UNet preset {args.preset}, images {shape}, "
          f"{sum(q.numel() for q in net.parameters()):,} parameters")
    print(f"training step (batch {args.batch}, median of {args.reps}):  FM {fm_s * 1e3:.1f} ms   EFM {efm_s * 1e3:.1f} ms"
          f"   ratio EFM/FM = {efm_s / fm_s:.3f}  (goal <= 1.05)")
    print(f"sampling ({args.samples} images, Heun {args.steps} steps, median of {args.sample_reps}):")
    for m in methods:
        print(f"  {m:20s} {med[m] * 1e3:8.3f} ms/image   NFE {nfe[m]}   ratio to EFM {med[m] / med['efm']:.2f}")
    print(f"classifier guidance / EFM = {med['classifier_guidance'] / med['efm']:.2f}  (goal >= 2)")


if __name__ == "__main__":
    main()
