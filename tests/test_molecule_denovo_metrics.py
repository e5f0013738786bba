"""Evaluators of generated molecules (domains.molecule.denovo_metrics)."""
import math

import numpy as np
import pytest

pytest.importorskip("rdkit")

from rdkit import Chem, DataStructs  # noqa: E402
from rdkit.Chem import rdFingerprintGenerator  # noqa: E402

from domains.molecule.denovo_metrics import (  # noqa: E402
    canonical,
    draw_grid,
    generation_metrics,
    internal_diversity,
    plot_property_histograms,
    property_summary,
)
from energyflow.errors import InputError  # noqa: E402

SAMPLES = ["CCO", "OCC", "c1ccccc1", "C1CC", None, "CCN"]


def _tanimoto(a, b):
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    return DataStructs.TanimotoSimilarity(gen.GetFingerprint(Chem.MolFromSmiles(a)),
                                          gen.GetFingerprint(Chem.MolFromSmiles(b)))


def test_canonical():
    assert canonical("OCC") == "CCO" == canonical("CCO")
    assert canonical("C1=CC=CC=C1") == "c1ccccc1"
    for bad in ("C1CC", "", None, "xyz"):
        assert canonical(bad) is None


def test_generation_metrics_by_hand():
    m = generation_metrics(SAMPLES, training={"CCO"})
    assert m["num_samples"] == 6 and m["num_valid"] == 4
    assert m["validity"] == pytest.approx(4 / 6)
    assert m["uniqueness"] == pytest.approx(3 / 4)
    assert m["novelty"] == pytest.approx(2 / 3)
    assert m["mean_heavy_atoms"] == pytest.approx((3 + 3 + 6 + 3) / 4)
    unique = ["CCO", "c1ccccc1", "CCN"]
    pairs = [_tanimoto(unique[i], unique[j]) for i in range(3) for j in range(i + 1, 3)]
    assert m["internal_diversity"] == pytest.approx(1 - np.mean(pairs))
    assert "novelty" not in generation_metrics(SAMPLES)


def test_generation_metrics_edge_cases():
    none_valid = generation_metrics(["C1CC", None], training=set())
    assert none_valid["validity"] == 0.0 and none_valid["uniqueness"] == 0.0 and none_valid["novelty"] == 0.0
    assert math.isnan(none_valid["internal_diversity"]) and math.isnan(none_valid["mean_heavy_atoms"])
    assert math.isnan(generation_metrics(["CCO", "OCC"])["internal_diversity"])  # one unique molecule
    assert generation_metrics([])["validity"] == 0.0
    # the cap: only the first two unique molecules enter the diversity
    capped = generation_metrics(["CCO", "CCN", "c1ccccc1"], max_diversity=2)
    assert capped["internal_diversity"] == pytest.approx(1 - _tanimoto("CCO", "CCN"))
    with pytest.raises(InputError, match="one string"):
        generation_metrics("CCO")


def test_internal_diversity():
    assert internal_diversity(["CCO", "OCC"]) == pytest.approx(0.0)
    pair = internal_diversity(["CC(=O)Nc1ccc(O)cc1", "c1ccccc1O", None])
    assert pair == pytest.approx(1 - _tanimoto("CC(=O)Nc1ccc(O)cc1", "c1ccccc1O"))
    assert 0 < pair < 1
    assert math.isnan(internal_diversity(["CCO", "C1CC"]))


def test_property_summary():
    values = np.array([1.0, 2.0, np.nan, 3.0, 4.0, np.inf])
    out = property_summary({"x": values, "empty": np.array([np.nan, np.nan])})
    x = out["x"]
    assert x["n"] == 4 and x["mean"] == pytest.approx(2.5)
    assert x["std"] == pytest.approx(math.sqrt(1.25))
    assert x["q50"] == pytest.approx(2.5)
    assert x["q10"] == pytest.approx(1.3) and x["q90"] == pytest.approx(3.7)
    assert out["empty"]["n"] == 0
    assert all(math.isnan(out["empty"][k]) for k in ("mean", "std", "q10", "q50", "q90"))


def test_property_histograms(tmp_path):
    rng = np.random.default_rng(0)
    groups = {"training set": {"qed": rng.uniform(0, 1, 200), "mw": rng.normal(300, 40, 200)},
              "unguided": {"qed": np.append(rng.uniform(0, 1, 50), np.nan), "mw": np.full(51, np.nan)},
              "EFM β=4": {"qed": rng.uniform(0.5, 1, 50), "mw": rng.normal(280, 20, 50)}}
    path = tmp_path / "sub" / "hist.png"
    out = plot_property_histograms(groups, ["qed", "mw"], str(path), targets={"qed": 0.7})
    assert out == str(path) and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["hist.png"]  # no temporary file left
    with pytest.raises(InputError, match="'tpsa'"):
        plot_property_histograms(groups, ["tpsa"], str(tmp_path / "x.png"))


def test_draw_grid_png_and_svg(tmp_path):
    png = draw_grid(SAMPLES, str(tmp_path / "grid.png"), legends=[f"m{i}" for i in range(6)], per_row=2, size=120)
    data = (tmp_path / "grid.png").read_bytes()
    assert png.endswith("grid.png") and data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as image:
        assert image.size == (2 * 120, 2 * 120)  # 4 valid molecules, 2 a row
    draw_grid(SAMPLES, str(tmp_path / "grid.svg"), legends=[f"m{i}" for i in range(6)])
    svg = (tmp_path / "grid.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "class='legend'" in svg
    # invalid entries are skipped together with their legends: same drawing as the valid ones alone
    valid = [0, 1, 2, 5]
    draw_grid([SAMPLES[i] for i in valid], str(tmp_path / "valid.svg"), legends=[f"m{i}" for i in valid])
    assert (tmp_path / "valid.svg").read_text() == svg
    draw_grid(SAMPLES, str(tmp_path / "shifted.svg"), legends=[f"m{i}" for i in range(1, 7)])
    assert (tmp_path / "shifted.svg").read_text() != svg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "grid.svg", "shifted.svg", "valid.svg"]


def test_draw_grid_bad_input(tmp_path):
    with pytest.raises(InputError, match="grid.jpg"):
        draw_grid(["CCO"], str(tmp_path / "grid.jpg"))
    with pytest.raises(InputError, match="legends"):
        draw_grid(["CCO"], str(tmp_path / "grid.png"), legends=["a", "b"])
    with pytest.raises(InputError, match="valid"):
        draw_grid(["C1CC", None], str(tmp_path / "grid.png"))
    assert not list(tmp_path.iterdir())
