"""The conformer experiment end to end at toy scale: stages, evaluation rows, SDF output, bad input."""
import json
import os

import pytest

pytest.importorskip("rdkit")
pytest.importorskip("torch_geometric")

from energyflow.cli import main  # noqa: E402
from energyflow.errors import InputError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "molecule_conformer.yaml")
TINY = ["experiment.trainer.steps=3", "experiment.evaluation.max_molecules=2", "experiment.sampler.steps=2",
        "experiment.reference.num_confs=4", "experiment.group_size=2", "experiment.trainer.batch_size=8",
        "experiment.progress=false", "experiment.evaluation.workers=1", "experiment.reference.workers=1",
        "experiment.evaluation.relax_steps=10", "device=cpu"]


@pytest.fixture
def smiles_file(tmp_path):
    lines = ["smiles", "CCO", "CCCO", "CCCCO", "CC(C)O", "c1ccccc1O", "Cc1ccccc1", "CCN", "CCCN", "C1CCCCC1",
             "C1CCCCC1C", "OC1CCCC1", "not_a_smiles", "[Na+].[Cl-]", "CC(=O)OC", "c1ccncc1", "CCOC"]
    path = tmp_path / "mols.smi"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_conformer_run_writes_rows_sdf_and_reuses_stages(tmp_path, smiles_file, capsys):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = ["run", RECIPE, *TINY, f"dataset={smiles_file}", "experiment.data.min_heavy=2",
            "experiment.data.split=[0.6,0.2,0.2]", f"experiment.cache_dir={cache}", "--run-dir", str(run_dir)]
    assert main(args) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["rows"]) == {"fm", "efm_T600", "efm_resampled_T600", "etkdg"}
    assert results["skipped"]["unparsable"] == 1 and results["skipped"]["fragments"] == 1
    for row in results["rows"].values():
        assert 0.0 <= row["cov_r@0.5"] <= 1.0 and row["amr_r"] >= 0 and row["seconds_per_conformer"] > 0
        assert row["energy_mean"] == row["energy_mean"]          # finite, never NaN
    known = results["known_answer"]
    assert known["mean"] <= known["untilted_mean"] + 1e-9 and known["noise"] >= 0
    assert (run_dir / "samples" / "efm_T600.sdf").read_text().count("$$$$") == 2 * 8
    assert (run_dir / "results.md").exists()
    # another temperature retrains only the EFM model; the molecule set and FM come from the cache
    before = sorted(os.listdir(cache))
    assert main([*args[:-1], str(tmp_path / "run2"), "temperature=300"]) == 0
    added = sorted(f for f in set(os.listdir(cache)) - set(before) if not f.startswith("."))
    assert len(added) == 2 and all(a.startswith("conformer-efm") for a in added)
    out = tmp_path / "c.sdf"
    assert main(["sample", str(run_dir), "--cond", "CCOC(=O)C", "-n", "3", "-o", str(out)]) == 0
    assert out.read_text().count("$$$$") == 3
    assert main(["sample", str(run_dir), "--cond", "C1CC", "-n", "3", "-o", str(out)]) == 2
    assert "not a valid SMILES" in capsys.readouterr().err


def test_bad_settings_fail_before_any_work(tmp_path):
    from domains.molecule.experiment import ConformerExperiment

    with pytest.raises(InputError, match="dataset=.*no such file"):
        ConformerExperiment(dataset=str(tmp_path / "missing.smi"))
    with pytest.raises(InputError, match="temperature"):
        ConformerExperiment(temperature=-5)
    with pytest.raises(InputError, match="models"):
        ConformerExperiment(models=["gfn"])
    with pytest.raises(InputError, match="batch_size"):
        ConformerExperiment(group_size=5, trainer={"batch_size": 64})
    with pytest.raises(InputError, match="experiment.data: unknown key"):
        ConformerExperiment(data={"max_atoms": 3})
    with pytest.raises(InputError, match="experiment.reference.workers"):
        ConformerExperiment(reference={"workers": 0})
    with pytest.raises(InputError, match="experiment.evaluation.workers"):
        ConformerExperiment(evaluation={"workers": "many"})
    assert abs(ConformerExperiment(beta=1.0).temperature - 503.2) < 0.1
