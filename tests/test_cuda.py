"""The same code on a GPU (skipped without CUDA): training, every sampler, guidance, and CPU/GPU agreement."""
import pytest
import torch

from domains.toy.datasets import sample_toy
from domains.toy.energies import SineEnergy
from domains.toy.target import ExactTiltedTarget
from energyflow.data import FunctionBatchSource
from energyflow.guidance import CEPGuidedPredictor, EnergyGuidedPredictor
from energyflow.losses import EnergyWeightedLoss
from energyflow.nets import MLPEnergyNet, MLPField
from energyflow.paths import CondOTPath, VPPath
from energyflow.predictor import Predictor
from energyflow.samplers import build_sampler
from energyflow.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_trainer_auto_device_is_cuda_and_learns_the_tilt(tmp_path):
    energy = SineEnergy(0.3, 1.0, 0.1)
    torch.manual_seed(0)
    trainer = Trainer(MLPField(2, hidden=64, depth=3), EnergyWeightedLoss(CondOTPath(), 3.0, energy),
                      FunctionBatchSource(lambda n, g: sample_toy("8gaussians", n, g)),
                      TrainerConfig(steps=1000, batch_size=1024, lr=3e-3, lr_schedule="cosine", ema_decay=0.99,
                                    progress=False, device="auto"),
                      out_dir=str(tmp_path))
    assert trainer.device.type == "cuda"
    trainer.fit()
    x = build_sampler("heun", 50).sample(Predictor(trainer.ema_module, CondOTPath()), torch.randn(8000, 2, device="cuda")).x
    exact = ExactTiltedTarget("8gaussians", energy, 3.0).sample(8000, torch.Generator().manual_seed(1)).cuda()
    data = sample_toy("8gaussians", 8000, torch.Generator().manual_seed(1)).cuda()
    # the samples' mean energy matches the exact target's (data: 0.00, exact q: about -0.28)
    assert abs(float(energy(x).mean() - energy(exact).mean())) < 0.04
    assert float(energy(data).mean() - energy(exact).mean()) > 0.1


@pytest.mark.parametrize("name", ["euler", "midpoint", "heun", "rk4", "dopri5", "em", "ancestral", "dpm"])
def test_samplers_agree_on_cpu_and_gpu(name):
    torch.manual_seed(0)
    net = MLPField(2, hidden=32, depth=2).double().eval()
    path = VPPath() if name == "dpm" else CondOTPath()
    kwargs = {"diffusion": 1.0} if (name == "em" and isinstance(path, CondOTPath)) else {}
    sampler = build_sampler(name, 20, **kwargs)
    x0 = torch.randn(8192, 2, dtype=torch.float64)
    outs = []
    for device in ("cpu", "cuda"):
        g = torch.Generator(device=device).manual_seed(0)
        pred = Predictor(net.to(device), path)
        if name in ("em", "ancestral"):
            outs.append(sampler.sample(pred, x0.to(device), generator=g).x.cpu())
        else:
            outs.append(sampler.sample(pred, x0.to(device)).x.cpu())
    if name in ("em", "ancestral"):  # different RNG streams: compare statistics (std error of a mean ≈ 0.015)
        assert torch.allclose(outs[0].mean(0), outs[1].mean(0), atol=0.06)
        assert torch.allclose(outs[0].std(0), outs[1].std(0), rtol=0.05)
    else:
        # adaptive dopri5 may pick other steps on the GPU (rounding): equal within its tolerance
        assert torch.allclose(outs[0], outs[1], atol=1e-4 if name == "dopri5" else 1e-6)


def test_guidance_runs_on_gpu():
    base = Predictor(MLPField(2, hidden=32, depth=2).cuda().eval(), CondOTPath())
    x0 = torch.randn(128, 2, device="cuda")
    for pred in (EnergyGuidedPredictor(base, SineEnergy(), 3.0), CEPGuidedPredictor(base, MLPEnergyNet(2, 32, 2).cuda())):
        x = build_sampler("euler", 10).sample(pred, x0).x
        assert x.is_cuda and torch.isfinite(x).all()


def test_unet_and_classifier_agree_on_cpu_and_gpu():
    pytest.importorskip("diffusers")
    from energyflow.image_nets import ConvClassifier, UNetField, unet_preset

    torch.manual_seed(0)
    unet = UNetField(**unet_preset("cpu", [1, 8, 8], num_classes=10)).double().eval()
    clf = ConvClassifier([1, 8, 8], 10).double().eval()
    x, t, y = torch.randn(64, 1, 8, 8, dtype=torch.float64), torch.rand(64, dtype=torch.float64), torch.randint(-1, 10, (64,))
    with torch.no_grad():
        cpu = (unet(x, t, y), clf(x))
        gpu = (unet.cuda()(x.cuda(), t.cuda(), y.cuda()).cpu(), clf.cuda()(x.cuda()).cpu())
    # diffusers computes the sinusoidal time embedding in float32 whatever the weights' dtype, so the
    # float64 nets agree to float32 rounding of the embedding (an H200 gave differences near 1e-7)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b, atol=1e-5)


def test_image_experiment_runs_every_algo_on_cuda(tmp_path):
    for module in ("diffusers", "torchvision", "torchmetrics", "sklearn"):
        pytest.importorskip(module)
    from domains.image.experiment import ALGOS, ImageExperiment

    tiny = {"steps": 2, "progress": False, "device": "cuda"}
    experiment = ImageExperiment(algo=list(ALGOS), betas=[1.0, 3.0], trainer=tiny, classifier={"steps": 2},
                                 evaluator={"steps": 2}, iterative={"steps": 2, "num_samples": 32},
                                 num_eval_samples=16, sampler={"name": "heun", "steps": 2}, seed=0)
    results = experiment.run(str(tmp_path / "run"))
    assert {r["method"] for r in results["rows"]} == set(ALGOS)
    assert all(0.0 <= r["target_rate"] <= 1.0 and r["nfe"] > 0 for r in results["rows"])
