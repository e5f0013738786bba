"""Every bad input and fault of the core CLI: exit code 2, one line naming the key or file, no
traceback, and nothing that existed before is lost (docs/reliability.md lists the guarantees)."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from energyflow.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "toy_8gaussians.yaml")
TINY = ["experiment.betas=[1]", "experiment.paths=[ot]", "experiment.baselines=[fm]", "experiment.trainer.steps=3",
        "experiment.num_eval_samples=100", "experiment.eval_repeats=1", "experiment.pool_size=20000",
        "experiment.trainer.progress=false", "device=cpu", "num_threads=1", "+experiment.plot=false"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished tiny toy run (read-only use: cases copy it before damaging it)."""
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    assert main(["run", RECIPE, *TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


def _copy(run_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _recipe_file(tmp_path, name, text):
    return str(_write(tmp_path / name, text))


def _model_file(run, name="efm_ot_beta1"):
    return run / "models" / f"{name}.pt"


def _stage_file(run, name, filename):
    stage = next((run / "stages").glob(f"{name}-*"))
    return stage / filename


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


# (id, setup(tmp_path, toy_run) -> argv, what the one line must contain)
CASES = [
    ("invalid-yaml", lambda t, r: ["run", _recipe_file(t, "bad.yaml", "experiment: [unclosed\n")], "bad.yaml"),
    ("yml-extension", lambda t, r: ["run", _recipe_file(t, "r.yml", "seed: 0\n")], "rename it to"),
    ("not-a-mapping", lambda t, r: ["run", _recipe_file(t, "list.yaml", "- 1\n- 2\n")], "must be a YAML mapping"),
    ("unknown-key", lambda t, r: ["run", RECIPE, *TINY, "experiment.nonsense=1"], "nonsense"),
    ("steps-abc", lambda t, r: ["run", RECIPE, *TINY, "experiment.trainer.steps=abc"], "steps"),
    ("steps-zero", lambda t, r: ["run", RECIPE, *TINY, "experiment.trainer.steps=0"], "steps"),
    ("batch-size-zero", lambda t, r: ["run", RECIPE, *TINY, "experiment.trainer.batch_size=0"], "batch_size"),
    ("log-every-zero", lambda t, r: ["run", RECIPE, *TINY, "experiment.trainer.log_every=0"], "log_every"),
    ("beta-nan", lambda t, r: ["run", RECIPE, *TINY, "experiment.betas=[nan]"], "experiment.betas"),
    ("beta-inf", lambda t, r: ["run", RECIPE, *TINY, "experiment.betas=[inf]"], "experiment.betas"),
    ("beta-negative", lambda t, r: ["run", RECIPE, *TINY, "experiment.betas=[-1]"], "experiment.betas"),
    ("beta-beyond-target", lambda t, r: ["run", RECIPE, *TINY, "experiment.betas=[1e6]"], "experiment.betas"),
    ("threads-zero", lambda t, r: ["run", RECIPE, *TINY, "num_threads=0"], "num_threads"),
    ("missing-recipe", lambda t, r: ["run", str(t / "nope.yaml")], "nope.yaml"),
    ("missing-run", lambda t, r: ["eval", str(t / "no_run")], "no_run"),
    ("corrupt-run-config", lambda t, r: ["eval", str(_write(_copy(r, t) / "config.yaml", "a: [b\n").parent)],
     "config.yaml"),
    ("sample-negative-n", lambda t, r: ["sample", str(r), "-n", "-5"], "--num-samples"),
    ("sample-zero-steps", lambda t, r: ["sample", str(r), "--steps", "0"], "--steps"),
    ("sample-missing-folder", lambda t, r: ["sample", str(r), "-o", str(t / "missing" / "x.pt")], "missing"),
    ("empty-model-file", lambda t, r: ["sample", str(_write(t / "m.pt", b""))], "m.pt"),
    ("garbage-model-file", lambda t, r: ["sample", str(_write(t / "m.pt", b"not a torch file at all"))], "m.pt"),
    ("truncated-stage-model", lambda t, r: (lambda c: (_truncate(_stage_file(c, "efm_ot_beta1", "models/efm_ot_beta1.pt")),
                                                         ["sample", str(c), "-m", "efm_ot_beta1"])[1])(_copy(r, t)),
     "efm_ot_beta1.pt"),
    ("truncated-model-file", lambda t, r: (lambda c: (_truncate(_model_file(c)), ["sample", str(_model_file(c))])[1])(
        _copy(r, t)), "efm_ot_beta1.pt"),
    ("corrupt-done-json", lambda t, r: (lambda c: (_write(_stage_file(c, "efm_ot_beta1", "done.json"), "{"),
                                                     ["run", RECIPE, *TINY, "--run-dir", str(c)])[1])(_copy(r, t)),
     "done.json"),
    ("truncated-checkpoint", lambda t, r: (lambda c: (
        shutil.rmtree(_stage_file(c, "fm_ot", "")), _write(_stage_file_path(c, "fm_ot"), b"PK\x03\x04trunc"),
        ["run", RECIPE, *TINY, "--run-dir", str(c)])[2])(_copy(r, t)), "checkpoint.pt"),
]


def _stage_file_path(run, name):
    """Where the fm_ot stage keeps its trainer checkpoint (the folder was removed: a half-done stage)."""
    from energyflow.cli import build_experiment, compose_recipe

    exp = build_experiment(compose_recipe(RECIPE, TINY))
    return pathlib_path(exp._stage(str(run), name).folder) / "train" / "checkpoint.pt"


def pathlib_path(p):
    import pathlib

    return pathlib.Path(p)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_and_faults_give_one_line(case, toy_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, setup, expected = case
    before = sorted(p.name for p in toy_run.iterdir())
    argv = setup(tmp_path, toy_run)
    if argv[0] == "run" and "--run-dir" not in argv:
        argv = [*argv, "--run-dir", str(tmp_path / "new_run")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("energyflow: error: ")]
    assert len(lines) == 1 and len(err.strip().splitlines()) <= 2, err  # at most "run directory: ..." before it
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in toy_run.iterdir()) == before  # the original run is untouched
    assert not (tmp_path / "new_run" / "config.yaml").exists()  # a refused run writes nothing


def test_a_crafted_pickle_in_a_model_file_is_refused_and_nothing_runs(toy_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    copy = _copy(toy_run, tmp_path)
    torch.save({"format": "energyflow-model/1", "payload": _Exploit(str(marker))}, _model_file(copy))
    assert main(["sample", str(_model_file(copy))]) == 2
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()
    stage_model = _stage_file(copy, "efm_ot_beta1", "models/efm_ot_beta1.pt")
    torch.save({"state_dict": {}, "payload": _Exploit(str(marker))}, stage_model)
    assert main(["sample", str(copy), "-m", "efm_ot_beta1"]) == 2
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()


def test_unwritable_run_directory_fails_before_evaluating(toy_run, tmp_path, capsys, monkeypatch):
    copy = _copy(toy_run, tmp_path)
    evaluated = []
    monkeypatch.setattr("domains.toy.experiment.ToyExperiment.evaluate", lambda *a, **k: evaluated.append(1))

    def deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("energyflow.files.tempfile.mkstemp", deny)
    assert main(["eval", str(copy)]) == 2
    assert "cannot write to run directory" in capsys.readouterr().err and not evaluated


def test_a_full_disk_while_writing_results_keeps_the_old_results(toy_run, tmp_path, capsys, monkeypatch):
    copy = _copy(toy_run, tmp_path)
    old = (copy / "results.json").read_text()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("energyflow.files.os.fsync", full)
    assert main(["run", RECIPE, *TINY, "--run-dir", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["energyflow: error: No space left on device"]
    assert (copy / "results.json").read_text() == old
    assert not [p for p in copy.rglob(".tmp-*")]


def test_a_failed_start_does_not_block_the_fixed_rerun(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", RECIPE, *TINY, "experiment.betas=[-1]", "--run-dir", str(run_dir)]) == 2
    assert main(["run", RECIPE, *TINY, "--run-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "results.json").read_text())["methods"]
