"""A wheel install stands on its own: build the wheel, install it into a fresh virtual environment,
check that ``energyflow`` and ``domains`` are imported from that install (not from this checkout),
then run the main recipe at a tiny budget from a temporary directory, which builds the default
dataset from the behaviour checkpoints shipped inside the wheel.

The fresh environment has no system site packages; a ``.pth`` file adds this interpreter's
site-packages after it, for the dependencies (torch, minari, ...).  A ``.pth`` line only appends a
folder to ``sys.path``: the ``.pth`` files inside that folder, such as setuptools' editable-install
hook that maps ``energyflow`` to this checkout, are not run.  The subprocesses also run with
``python -I`` (no ``PYTHONPATH``, no user site, no current directory on ``sys.path``).
"""
import json
import os
import shutil
import site
import subprocess
import sys
import venv

import pytest

pytest.importorskip("minari")
pytest.importorskip("mujoco")

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_QIPO = [  # as in tests/test_cli.py: a few steps of every stage, a 6 x 60-step default dataset
    "experiment.default_dataset.id=energyflow/test-walker-v0", "experiment.default_dataset.steps_per_actor=[60,60,60,60,60,60]",
    "experiment.qipo.behaviour.steps=20", "experiment.qipo.critic.steps=20", "experiment.qipo.critic_states=256",
    "experiment.qipo.rounds=1", "experiment.qipo.round_steps=5", "experiment.qipo.round_states=64",
    "experiment.qipo.qgpo.steps=10", "experiment.qipo.hidden=32", "experiment.qipo.critic_hidden=32",
    "experiment.eval_episodes=2", "experiment.progress=false", "device=cpu",
]

# Runs inside the fresh environment: where every energyflow/domains module and the data plugin come from.
WHERE = """
import importlib.metadata as md, json, sys
import energyflow, energyflow.cli, domains, domains.rl.cli, domains.rl.behaviour as behaviour
mods = {n: m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in ('energyflow', 'domains')
        and getattr(m, '__file__', None)}
eps = [ep.value for ep in md.entry_points(group='energyflow.commands')]
print(json.dumps({'modules': mods, 'checkpoints': str(behaviour.CHECKPOINT_DIR),
                  'shipped': sorted(behaviour.shipped_checkpoints()), 'entry_points': eps,
                  'dist': str(md.distribution('energyflow').locate_file(''))}))
"""

# Runs the recipe through the CLI, then lists any energyflow/domains module loaded from elsewhere.
RUN = """
import json, sys
from energyflow.cli import main
code = main(sys.argv[2:])
mods = {n: m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in ('energyflow', 'domains')
        and getattr(m, '__file__', None)}
print('MODULES ' + json.dumps(mods))
sys.exit(code)
"""


def _run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{cmd[:4]} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _copy_source(dest):
    """The files a wheel is built from, copied so the build writes nothing into the checkout."""
    os.makedirs(dest)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(ROOT, name), dest)
    for pkg in ("energyflow", "domains"):
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(dest, pkg),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def test_wheel_install_runs_the_walker_recipe(tmp_path):
    src, wheels, env_dir, work = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv", tmp_path / "work"
    _copy_source(str(src))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)])
    (wheel,) = wheels.glob("energyflow-*.whl")

    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(str(env_dir))
    python = str(env_dir / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", str(wheel)])
    target = _run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # the dependencies: this interpreter's site-packages, after the fresh environment's own
    with open(os.path.join(target, "_energyflow_test_deps.pth"), "w", encoding="utf-8") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")

    work.mkdir()
    shutil.copy2(os.path.join(ROOT, "recipes", "qipo_walker.yaml"), work)
    shutil.copytree(os.path.join(ROOT, "recipes", "scale"), work / "scale")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(MINARI_DATASETS_PATH=str(tmp_path / "minari"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MPLBACKEND="Agg")

    where = json.loads(_run([python, "-I", "-c", WHERE], cwd=work, env=env).stdout.strip().splitlines()[-1])
    target = os.path.realpath(target)
    for name, path in where["modules"].items():
        assert os.path.realpath(path).startswith(target + os.sep), f"{name} imported from {path}, not the wheel"
    assert os.path.realpath(where["dist"]).startswith(target)
    assert os.path.realpath(where["checkpoints"]).startswith(target + os.sep)
    assert where["shipped"] == ([f"halfcheetah_sac_{k}.pt" for k in ("080k", "200k")] + ["hopper_sac_120k.pt"]
                                + [f"walker2d_sac_{k}.pt" for k in ("020k", "100k", "140k", "180k", "200k")])
    assert where["entry_points"] == ["domains.rl.cli:register"]

    out = _run([python, "-I", "-c", RUN, "--", "run", "qipo_walker.yaml", *TINY_QIPO, "--run-dir", "run"],
               cwd=work, env=env, timeout=240)
    assert "building energyflow/test-walker-v0 from 6 behaviour checkpoints" in out.stdout + out.stderr
    loaded = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("MODULES "))[8:])
    assert loaded and all(os.path.realpath(p).startswith(target + os.sep) for p in loaded.values()), loaded
    results = json.loads((work / "run" / "results.json").read_text())
    assert results["algo"] == "qipo_ot"
    assert os.path.isdir(tmp_path / "minari" / "energyflow" / "test-walker-v0" / "data")
