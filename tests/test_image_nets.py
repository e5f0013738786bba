"""Image networks in the core: diffusers' UNet behind net(x, t, cond), the classifier, and model files
that reload without domain code."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("diffusers")

from energyflow.image_nets import ConvClassifier, UNetField, unet_preset  # noqa: E402
from energyflow.models import save_model_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_time_convention_t0_is_noise_and_scalar_t_is_expanded(monkeypatch):
    torch.manual_seed(0)
    net = UNetField(**unet_preset("cpu", [1, 8, 8])).eval()
    assert torch.equal(net.timestep(torch.tensor([0.0, 1.0, 0.25])), torch.tensor([1000.0, 0.0, 750.0]))
    seen = {}
    inner = net.unet.forward

    def spy(sample, timestep, class_labels=None, return_dict=True):
        seen["timestep"] = timestep.clone()
        return inner(sample, timestep, class_labels=class_labels, return_dict=return_dict)

    monkeypatch.setattr(net.unet, "forward", spy)
    x = torch.randn(3, 1, 8, 8)
    net(x, torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(seen["timestep"], torch.tensor([1000.0, 0.0, 500.0]))  # t=0 noise -> time_scale
    out = net(x, torch.tensor(0.0))
    assert seen["timestep"].shape == (3,) and torch.equal(seen["timestep"], torch.full((3,), 1000.0))
    assert torch.equal(out, net(x, torch.zeros(3)))
    scaled = UNetField([1, 8, 8], time_scale=1.0)
    assert torch.equal(scaled.timestep(torch.tensor([0.0, 1.0])), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("shape", [[1, 8, 8], [3, 32, 32]])
def test_cpu_preset_output_shape(shape):
    torch.manual_seed(0)
    kwargs = unet_preset("cpu", shape)
    assert kwargs["image_shape"] == shape and kwargs["num_classes"] == 0 and kwargs["attention"] is False
    assert kwargs["block_out_channels"] == ([32, 64, 64] if shape[1] >= 32 else [32, 64])
    net = UNetField(**kwargs)
    assert net.sample_shape == tuple(shape) and net.null_label is None
    assert net(torch.randn(2, *shape), torch.rand(2)).shape == (2, *shape)


def test_presets_are_plain_data_and_unknown_names_are_refused():
    gpu = unet_preset("gpu", (3, 32, 32), num_classes=10)
    assert gpu == {"image_shape": [3, 32, 32], "block_out_channels": [64, 128, 256, 256], "layers_per_block": 2,
                   "attention": True, "num_classes": 10, "norm_num_groups": 32}
    assert unet_preset("gpu", [1, 8, 8])["block_out_channels"] == [64, 128, 256]
    with pytest.raises(ValueError, match="cpu.*gpu"):
        unet_preset("tpu", [1, 8, 8])


def test_class_conditioning_and_the_null_label():
    torch.manual_seed(0)
    net = UNetField(**unet_preset("cpu", [1, 8, 8], num_classes=3)).eval()
    assert net.null_label == 3
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.3)
    with torch.no_grad():
        torch.nn.init.normal_(net.unet.class_embedding.weight)  # distinct embeddings (as after training)
        a = net(x, t, torch.tensor([0, 0]))
        b = net(x, t, torch.tensor([1, 1]))
        assert not torch.allclose(a, b)
        none = net(x, t)
        assert torch.equal(none, net(x, t, torch.tensor([-1, -1])))
        assert torch.equal(none, net(x, t, torch.tensor([3, 3])))
        assert torch.equal(none, net(x, t, {"label": None, "mask": torch.ones(2)}))
        assert torch.equal(a, net(x, t, {"label": torch.tensor([0, 0]), "mask": torch.ones(2)}))
        mixed = net(x, t, torch.tensor([0, -1]))
        assert torch.equal(mixed[0], a[0]) and torch.equal(mixed[1], none[1])
    with pytest.raises(ValueError, match="labels"):
        net(x, t, torch.tensor([0, 4]))
    uncond = UNetField(**unet_preset("cpu", [1, 8, 8]))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, {"label": torch.tensor([0, 1])})
    uncond(x, t, {"mask": torch.ones(2)})  # other keys are ignored


def test_bad_image_shape_is_refused_by_name():
    with pytest.raises(ValueError, match="image_shape"):
        UNetField([1, 6, 6], block_out_channels=[32, 64, 64])  # 6 is not divisible by 4
    with pytest.raises(ValueError, match="image_shape"):
        UNetField([8, 8])
    with pytest.raises(ValueError, match="image_shape"):
        ConvClassifier([1, 8, 8.5])
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetField([1, 8, 8], block_out_channels=[12, 24])


def test_gradients_flow_and_eval_is_deterministic():
    torch.manual_seed(0)
    net = UNetField(**unet_preset("cpu", [1, 8, 8], num_classes=2), dropout=0.1)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    loss = net(x, t, torch.tensor([0, 1, -1, 0])).square().mean()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize("arch", ["conv", "mlp"])
@pytest.mark.parametrize("shape", [[1, 8, 8], [3, 32, 32]])
def test_classifier_logits_and_features(arch, shape):
    torch.manual_seed(0)
    net = ConvClassifier(shape, num_classes=7, arch=arch, width=8, num_features=16).eval()
    assert isinstance(net.num_features, int) and net.num_features == 16
    x = torch.rand(5, *shape) * 2 - 1
    assert net(x).shape == (5, 7) and net.features(x).shape == (5, 16)
    assert torch.equal(net(x, torch.rand(5), {"label": None}), net(x))
    with pytest.raises(ValueError, match="arch"):
        ConvClassifier(shape, arch="resnet")


def test_the_two_classifier_archs_are_different_networks():
    conv, mlp = ConvClassifier([1, 8, 8], arch="conv"), ConvClassifier([1, 8, 8], arch="mlp")
    assert any(isinstance(m, torch.nn.Conv2d) for m in conv.modules())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in mlp.modules())


def test_model_files_reload_without_domain_code(tmp_path):
    torch.manual_seed(0)
    unet = UNetField(**unet_preset("cpu", [1, 8, 8], num_classes=3)).eval()
    clf = ConvClassifier([1, 8, 8], num_classes=4, arch="conv", width=8, num_features=16).eval()
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 1, 8, 8, generator=gen), torch.rand(3, generator=gen)
    labels = torch.tensor([0, 2, -1])
    with torch.no_grad():
        expected = {"unet": unet(x, t, labels), "logits": clf(x), "features": clf.features(x)}
    torch.save({"x": x, "t": t, "labels": labels, **expected}, tmp_path / "expected.pt")
    save_model_file(tmp_path / "m.pt", unet, path="ot", sample_shape=unet.sample_shape)
    save_model_file(tmp_path / "c.pt", clf, sample_shape=clf.sample_shape)
    result = _run(f"""
        import sys
        import torch
        torch.set_num_threads(1)
        import energyflow
        unet = energyflow.load_model({str(tmp_path / "m.pt")!r})
        clf = energyflow.load_model({str(tmp_path / "c.pt")!r})
        e = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        assert type(unet.net).__name__ == "UNetField" and unet.sample_shape == (1, 8, 8), unet
        assert type(clf.net).__name__ == "ConvClassifier" and clf.net.num_features == 16
        assert unet.path is not None and unet.net.null_label == 3
        with torch.no_grad():
            assert torch.equal(unet.net(e["x"], e["t"], e["labels"]), e["unet"])
            assert torch.equal(clf.net(e["x"]), e["logits"])
            assert torch.equal(clf.net.features(e["x"]), e["features"])
        assert not any(m == "domains" or m.startswith("domains.") for m in sys.modules)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_importing_energyflow_and_its_core_models_does_not_import_diffusers():
    result = _run("""
        import sys
        import energyflow
        import energyflow.models as m
        m._import_core_models()
        assert "energyflow.image_nets" in sys.modules
        assert "energyflow.UNetField" in m.registered_models()
        assert "energyflow.ConvClassifier" in m.registered_models()
        assert "diffusers" not in sys.modules, "diffusers imported"
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
