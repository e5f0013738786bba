"""The de novo molecule experiment end to end at toy scale: stages, β auto, rows, SMILES and grid output, bad input."""
import json
import os

import pytest

pytest.importorskip("rdkit")
pytest.importorskip("selfies")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from energyflow.cli import main  # noqa: E402
from energyflow.errors import InputError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "molecule_qed.yaml")
TINY = ["experiment.trainer.steps=3", "experiment.vae.steps=3", "experiment.sampler.steps=2", "experiment.trainer.batch_size=8",
        "experiment.iterative.rounds=2", "experiment.iterative.num_samples=16", "experiment.iterative.steps=2",
        "experiment.evaluation.num_samples=12", "experiment.evaluation.grid=4", "experiment.evaluation.workers=1",
        "experiment.data.workers=1", "experiment.progress=false", "experiment.trainer.progress=false", "device=cpu"]


@pytest.fixture
def smiles_file(tmp_path):
    lines = ["smiles", "CCO", "CCCO", "CCCCO", "CC(C)O", "c1ccccc1O", "Cc1ccccc1", "CCN", "CCCN", "C1CCCCC1",
             "C1CCCCC1C", "OC1CCCC1", "not_a_smiles", "C1CC", "[Na+].[Cl-]", "CC(=O)OC", "c1ccncc1", "CCOC",
             "CC(=O)Nc1ccc(O)cc1", "CCO"]
    path = tmp_path / "mols.smi"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_denovo_run_rows_outputs_skips_and_stage_reuse(tmp_path, smiles_file, capsys):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = ["run", RECIPE, *TINY, f"dataset={smiles_file}", "experiment.data.min_heavy=2",
            f"experiment.cache_dir={cache}", "--run-dir", str(run_dir)]
    assert main(args) == 0
    results = json.loads((run_dir / "results.json").read_text())
    # invalid entries are skipped and counted, never a crash: two unparsable, one salt, one duplicate
    assert results["skipped"]["unparsable"] == 2 and results["skipped"]["fragments"] == 1
    assert results["skipped"]["duplicate"] == 1 and results["molecules"] == 15
    assert set(results["rows"]) == {"training set", "training best-12", "unguided", "efm", "iterative"}
    assert results["beta_setting"] == "auto" and results["beta"] > 0
    assert results["iterative_final_beta"] == pytest.approx(2 * results["beta"])
    for name, row in results["rows"].items():
        assert 0 <= row["validity"] <= 1 and np.isfinite(row["energy_mean"])
        assert 0 <= row["target_fraction"] <= 1
    best = results["rows"]["training best-12"]
    assert best["energy_mean"] <= results["rows"]["training set"]["energy_mean"]
    assert (run_dir / "samples" / "efm.smi").read_text().count("\n") == 12
    assert (run_dir / "properties.png").stat().st_size > 1000
    # (a 3-step model's samples may all decode to nothing: grids are drawn only of valid molecules)
    assert (run_dir / "grid_unguided.png").exists() == (results["rows"]["unguided"]["num_valid"] > 0)
    assert "| efm |" in (run_dir / "results.md").read_text()
    # another energy retrains EFM and the iterative chain only; the molecule set and the unguided model are reused
    before = set(os.listdir(cache))
    assert main([*args[:-1], str(tmp_path / "run2"), "energy=logp", "target=3"]) == 0
    added = sorted(f for f in set(os.listdir(cache)) - before if not f.startswith("."))
    assert len(added) == 2 and {a.split("-")[1] for a in added} == {"efm", "iterative"}
    # energyflow sample writes SMILES, one line per sample, and a grid beside them
    out = tmp_path / "mols.smi"
    assert main(["sample", str(run_dir), "-m", "efm", "-n", "5", "-o", str(out)]) == 0
    assert out.read_text().count("\n") == 5
    assert main(["sample", str(run_dir), "-m", "nonsense", "-n", "5", "-o", str(out)]) == 2
    assert "--model must be one of" in capsys.readouterr().err


def test_token_representation_runs(tmp_path, smiles_file):
    run_dir = tmp_path / "run"
    assert main(["run", RECIPE, *TINY, f"dataset={smiles_file}", "experiment.data.min_heavy=2",
                 "experiment.representation=tokens", "experiment.net={hidden: 16, layers: 1, heads: 2, ff: 16}",
                 "models=[unguided,iterative]", f"experiment.cache_dir={tmp_path / 'cache'}", "--run-dir",
                 str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["representation"] == "tokens" and set(results["rows"]) >= {"unguided", "iterative"}


def test_selfies_vae_shapes_objective_and_greedy_decoding():
    from domains.molecule.selfies_codec import SelfiesCodec
    from domains.molecule.selfies_vae import SelfiesVAE, VAEObjective

    smiles = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCN"]
    codec, _, _ = SelfiesCodec.fit(smiles, max_len=20)
    tokens, _, _ = codec.encode(smiles)
    torch.manual_seed(0)
    vae = SelfiesVAE(len(codec), codec.max_len, embed=8, hidden=16, latent=4)
    logits, mu, logvar = vae(tokens)
    assert logits.shape == (4, 20, len(codec)) and mu.shape == logvar.shape == (4, 4)
    objective = VAEObjective(4, kl_weight=0.5)
    batch = objective.prepare({"x1": tokens}, torch.Generator().manual_seed(0))
    out = objective(vae, batch)
    # the loss is the summed cross-entropy plus 0.5 KL, computed here by hand
    logits, mu, logvar = vae(tokens, batch["eps"])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, len(codec)), tokens.reshape(-1), reduction="sum") / 4
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum() / 4
    assert torch.allclose(out.loss, ce + 0.5 * kl, atol=1e-5)
    # greedy decoding is batched and agrees with the teacher-forced logits of its own output
    z = torch.randn(3, 4)
    decoded = vae.decode(z)
    assert decoded.shape == (3, 20) and decoded.dtype == torch.long
    assert torch.equal(vae.decode_logits(z, decoded).argmax(-1), decoded)
    # a few hundred steps memorise four molecules: the posterior mean decodes back to each of them
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        loss = VAEObjective(4, kl_weight=0.01)(vae, VAEObjective(4).prepare({"x1": tokens}, g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert codec.decode_tokens(vae.decode(vae.encode(tokens)[0])) == codec.decode_tokens(tokens)


def test_write_samples_smiles_lines_and_grid(tmp_path):
    from domains.molecule.denovo import DeNovoExperiment
    from energyflow.experiment import SampleRecord

    record = SampleRecord(x=torch.zeros(3, 4, dtype=torch.long), meta={"smiles": ["CCO", None, "c1ccccc1"]})
    exp = DeNovoExperiment()
    exp.write_samples(record, str(tmp_path / "m.smi"))
    assert (tmp_path / "m.smi").read_text() == "CCO\n\nc1ccccc1\n"          # one line per sample, invalid empty
    assert (tmp_path / "m.png").stat().st_size > 1000
    exp.write_samples(record, str(tmp_path / "g.svg"))
    assert "<svg" in (tmp_path / "g.svg").read_text()


def test_beta_auto_keeps_the_batch_ess():
    from domains.molecule.denovo import DeNovoData, DeNovoExperiment
    from domains.molecule.selfies_codec import SelfiesCodec
    from energyflow.iterative import batch_ess_fraction

    smiles = ["CCO", "CCCO", "c1ccccc1O", "CCN"] * 64
    codec, _, _ = SelfiesCodec.fit(smiles)
    tokens, _, _ = codec.encode(smiles)
    qed = np.random.default_rng(0).uniform(0.2, 0.9, len(smiles))
    data = DeNovoData({"smiles": smiles, "tokens": tokens, "codec": codec.to_dict(),
                       "props": {"qed": torch.from_numpy(qed)}})
    exp = DeNovoExperiment(trainer={"batch_size": 32}, beta_auto_ess=0.3)
    beta = exp.resolve_beta(data)
    order = torch.randperm(len(qed), generator=torch.Generator().manual_seed(0))
    e = torch.from_numpy(-qed)[order]
    assert batch_ess_fraction(e, beta, 32) == pytest.approx(0.3, abs=0.01)
    assert DeNovoExperiment(beta=5.0).resolve_beta(data) == 5.0


@pytest.mark.parametrize("kwargs, key", [
    ({"energy": "potency"}, "potency"), ({"energy": "qed", "target": "x"}, "target"), ({"beta": "hot"}, "beta"),
    ({"beta": -1.0}, "beta"), ({"models": ["efm", "gan"]}, "models"), ({"data": {"max_len": 1}}, "max_len"),
    ({"trainer": {"steps": 0}}, "steps"), ({"iterative": {"rounds": 0}}, "rounds"),
    ({"evaluation": {"nums": 3}}, "nums"), ({"dataset": "/no/such/file.smi"}, "no such file"),
    ({"representation": "graph"}, "representation"), ({"net": {"layers": 2}}, "layers"),
    ({"vae": {"latent": 0}}, "latent"),
    ({"energy": "combo", "target": 3.0}, "target"),
    ({"data": {"workers": 0}}, "experiment.data.workers"), ({"evaluation": {"workers": "many"}}, "experiment.evaluation.workers"),
])
def test_bad_settings_fail_before_any_work(kwargs, key):
    from domains.molecule.denovo import DeNovoExperiment

    with pytest.raises(InputError, match=key):
        DeNovoExperiment(**kwargs)


def test_denovo_table_averages_runs(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("denovo_table", os.path.join(ROOT, "benchmarks", "molecule_denovo_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dirs = []
    for seed, qed in [(0, 0.5), (1, 0.7)]:
        row = {"validity": 1.0, "uniqueness": 0.9, "novelty": 0.8, "internal_diversity": 0.85, "target_fraction": qed / 2,
               "properties": {"qed": {"mean": qed}}, "seconds_per_molecule": 0.001}
        result = {"dataset": "nci", "energy": "−QED", "beta": 10.0, "beta_setting": "auto", "num_samples": 10,
                  "seed": seed, "representation": "latent", "rows": {"iterative": row, "training set": dict(row)}}
        d = tmp_path / f"s{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(result))
        dirs.append(str(d))
    assert module.main(dirs) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| training set") and lines[2].startswith("| iterative")
    assert "0.600 ± 0.100" in lines[2] and "1.00 ± 0.00" in lines[2]
    assert module.main([str(tmp_path / "missing")]) == 2


def test_efm_scores_decoded_or_data(tmp_path, smiles_file):
    """EFM on latent codes weights each code by its training molecule's energy (data) or by the energy of
    the molecule the code decodes to (decoded: exact for the model's decoded distribution)."""
    from domains.molecule.denovo import DeNovoExperiment
    from domains.molecule.selfies_vae import SelfiesVAE  # noqa: F401 - registers the class
    from energyflow.files import load_torch
    from energyflow.models import load_model

    kwargs = dict(dataset=str(smiles_file), data={"min_heavy": 2, "workers": 1}, vae={"steps": 30},
                  trainer={"batch_size": 8, "progress": False}, evaluation={"workers": 1}, progress=False,
                  cache_dir=str(tmp_path / "cache"))
    run_dir = str(tmp_path / "run")
    exp = DeNovoExperiment(efm_scores="data", **kwargs)
    data = exp.data(run_dir)
    np.testing.assert_array_equal(exp.efm_energies(run_dir), exp.energy(data.props))
    decoded = DeNovoExperiment(efm_scores="decoded", **kwargs)
    stage = decoded.train_vae(run_dir)
    lat = load_torch(stage.file("latents.pt"))
    vae = load_model(stage.file("vae.pt")).net.eval()
    smiles = data.codec.decode_tokens(vae.decode(lat["mu"]))
    expected = decoded.energy.from_smiles(smiles)[0]
    np.testing.assert_allclose(decoded.efm_energies(run_dir), expected)
    assert decoded.model_stage(run_dir, "efm").key != exp.model_stage(run_dir, "efm").key
    with pytest.raises(InputError, match="efm_scores"):
        DeNovoExperiment(efm_scores="both")


def test_the_autoencoder_key_covers_the_trainer_settings_it_trains_with(tmp_path, smiles_file):
    """The autoencoder trains with the flow trainer's schedule, warm-up and EMA (and its own steps,
    batch size and lr): changing any of those retrains it; the flow's own steps do not."""
    from domains.molecule.denovo import DeNovoExperiment

    def key(**trainer):
        exp = DeNovoExperiment(dataset=str(smiles_file), data={"min_heavy": 2, "workers": 1}, vae={"steps": 30},
                               trainer={"batch_size": 8, "progress": False, **trainer}, progress=False,
                               cache_dir=str(tmp_path / "cache"))
        return exp.vae_stage(str(tmp_path / "run")).key

    base = key()
    assert key(ema_decay=0.0) != base and key(lr_schedule="constant") != base and key(warmup_steps=0) != base
    assert key(steps=7) == base and key(lr=0.5) == base and key(log_every=1) == base
