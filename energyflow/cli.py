"""The ``energyflow`` command line: run a recipe, sample from a run, evaluate a run.

Domain stacks (torchvision, diffusers, RDKit…) are imported only by the commands that need them,
so ``energyflow --help`` stays fast.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from typing import Any, Optional, Sequence

from .errors import InputError

__all__ = ["main", "compose_recipe", "build_experiment"]

EPILOG_RUN = """examples:
  energyflow run recipes/toy_8gaussians.yaml
  energyflow run recipes/toy_8gaussians.yaml seed=1 experiment.betas=[1,5] experiment.trainer.steps=500
  energyflow run recipes/toy_8gaussians.yaml --run-dir runs/mine     # rerun to resume
  energyflow run recipes/toy_8gaussians.yaml --multirun seed=0,1,2 --run-dir runs/seeds   # a sweep
  torchrun --nproc_per_node 2 -m energyflow run recipes/toy_8gaussians.yaml              # data-parallel

Overrides use Hydra's syntax (key=value, +new_key=value, ~key).  The run directory receives the
resolved config.yaml, the cached training stages (stages/<name>-<key>/ with metrics.jsonl,
tensorboard logs and checkpoint.pt), the trained models (models/, self-describing: 'energyflow
sample FILE'), results.json, eval.json and figures.  Rerunning a run directory resumes it; a changed
setting retrains exactly the stages it affects.
"""


class RecipeError(InputError):
    """A recipe that cannot be loaded, composed or instantiated."""


PLUGIN_GROUP = "energyflow.commands"
"""Entry-point group through which installed domains add commands: each entry point names a
function ``register(subparsers)`` that adds its sub-command (with ``set_defaults(func=...)``; the
function receives the parsed arguments and returns the exit code).  Keep the module it lives in
light: import the domain's stack inside the command, so ``energyflow --help`` stays fast."""


def _add_plugin_commands(sub) -> None:
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as err:  # a broken plugin must not break the core commands
            print(f"energyflow: warning: skipping the '{ep.name}' command of {ep.value}: {err}", file=sys.stderr)


def compose_recipe(recipe: str, overrides: Sequence[str] = ()):
    """Compose a recipe file with Hydra overrides; returns an ``omegaconf.DictConfig``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = os.path.abspath(recipe)
    if not os.path.isfile(path):
        raise RecipeError(f"recipe not found: {recipe}")
    if not path.endswith(".yaml"):
        hint = f" (rename it to {os.path.splitext(recipe)[0]}.yaml)" if path.endswith(".yml") else ""
        raise RecipeError(f"a recipe is a .yaml file (Hydra reads only that extension), got {recipe}{hint}")
    _check_yaml(path, "recipe")
    folder, name = os.path.split(path)
    try:
        with initialize_config_dir(config_dir=folder, version_base=None):
            cfg = compose(config_name=os.path.splitext(name)[0], overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise RecipeError(f"cannot compose {recipe} with overrides {list(overrides)}: {err}") from err
    if "experiment" not in cfg or "_target_" not in cfg.experiment:
        raise RecipeError(f"{recipe} has no 'experiment' node with a '_target_' (the Experiment class to build)")
    return cfg


def _check_yaml(path: str, what: str) -> None:
    """Parse ``path`` as YAML; a syntax error becomes one line naming the file and position."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{what} {path} is not valid YAML ({problem} at{where or ' an unknown position'})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{what} {path} is not UTF-8 text") from None
    if doc is not None and not isinstance(doc, dict):
        raise RecipeError(f"{what} {path} must be a YAML mapping (key: value lines), got a {type(doc).__name__}")


def build_experiment(cfg) -> Any:
    """Instantiate ``cfg.experiment`` (an :class:`~energyflow.experiment.Experiment`)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from .experiment import Experiment

    try:
        experiment = instantiate(cfg.experiment, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, InputError):  # the experiment's own validation: its message names the key
            raise RecipeError(str(cause)) from None
        raise RecipeError(f"cannot build the experiment {cfg.experiment.get('_target_')}: {_one_line(err)}") from None
    except InputError:
        raise
    except (TypeError, ValueError, ImportError) as err:
        raise RecipeError(f"cannot build the experiment {cfg.experiment.get('_target_')}: {_one_line(err)}") from None
    if not isinstance(experiment, Experiment):
        raise RecipeError(f"{cfg.experiment._target_} is not an energyflow Experiment")
    return experiment


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines)[:500] or type(err).__name__


def _default_run_dir(recipe: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", os.path.splitext(os.path.basename(recipe))[0], stamp)


def _load_run(run_dir: str, overrides: Sequence[str] = ()):
    from omegaconf import OmegaConf

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise RecipeError(f"{run_dir} is not a run directory (no config.yaml); create one with 'energyflow run'")
    _check_yaml(cfg_path, "run config")
    cfg = OmegaConf.load(cfg_path)
    if "experiment" not in cfg or "_target_" not in cfg.experiment:
        raise RecipeError(f"run config {cfg_path} has no 'experiment' node with a '_target_'")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def _apply_runtime(cfg) -> None:
    from .runtime import seed_everything, set_threads

    threads, seed = cfg.get("num_threads"), cfg.get("seed", 0)
    if threads is not None and threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise RecipeError(f"num_threads must be a positive integer or 'auto', got {threads!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"seed must be an integer, got {seed!r}")
    set_threads(threads)
    seed_everything(seed)


def _has_outputs(run_dir: str) -> bool:
    """Whether ``run_dir`` holds anything besides its config.yaml (a failed start leaves nothing else)."""
    for folder, _, files in os.walk(run_dir):
        if any(f != "config.yaml" or folder != run_dir for f in files if not f.startswith(".")):
            return True
    return False


def _prepare_run_dir(cfg, run_dir: str, force: bool) -> None:
    """Refuse a run directory holding another config's outputs; check it is writable; save config.yaml."""
    from omegaconf import OmegaConf

    from .files import check_writable, write_text

    saved = os.path.join(run_dir, "config.yaml")
    if os.path.exists(saved) and not force:
        _check_yaml(saved, "run config")
        if OmegaConf.load(saved) != cfg and _has_outputs(run_dir):
            raise RecipeError(f"{run_dir} holds a run with a different config; pick another --run-dir or pass --force")
    check_writable(run_dir, "run directory")
    write_text(OmegaConf.to_yaml(cfg), saved)
    print(f"run directory: {run_dir}", file=sys.stderr)


def _run_point(cfg, run_dir: str, force: bool = False) -> dict[str, Any]:
    """One run of a composed recipe into ``run_dir`` (one process)."""
    _apply_runtime(cfg)
    experiment = build_experiment(cfg)
    _prepare_run_dir(cfg, run_dir, force)
    return experiment.run(run_dir)


def cmd_multirun(args: argparse.Namespace) -> int:
    from .sweeps import flatten_numbers, point_dirs, run_multirun, write_summary

    compose_recipe(args.recipe, [])  # the recipe itself is checked first
    sweep_dir = args.run_dir or _default_run_dir(args.recipe) + "-sweep"

    swept = run_multirun(args.recipe, args.overrides, sweep_dir, lambda cfg, d: _run_point(cfg, d, args.force))
    # the summary's headline numbers: the experiment's own pick (read from a point's saved config,
    # so it works whichever launcher ran the points), else every number of results.json
    points = point_dirs(sweep_dir)
    experiment = build_experiment(_load_run(points[0])) if points else None
    rows = write_summary(sweep_dir, getattr(experiment, "headline", None) or flatten_numbers, swept)
    print(f"{len(rows)} runs in {sweep_dir}; summary: {os.path.join(sweep_dir, 'summary.csv')}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import broadcast_object, init_distributed, is_main_process, resolve_device

    if args.multirun:
        return cmd_multirun(args)
    cfg = compose_recipe(args.recipe, args.overrides)
    _apply_runtime(cfg)
    experiment = build_experiment(cfg)  # validates every setting before anything is written
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        if not getattr(experiment, "supports_distributed", False):
            raise RecipeError(f"{cfg.experiment._target_} does not support torchrun (data-parallel) runs; "
                              f"run it as one process")
        init_distributed(resolve_device(str(cfg.get("device", "auto"))))
    main = is_main_process()
    run_dir = args.run_dir or cfg.get("run_dir") or _default_run_dir(args.recipe)
    if distributed:  # the time-stamped default may differ between ranks: rank 0's wins
        run_dir = broadcast_object(run_dir)
    if main:
        _prepare_run_dir(cfg, run_dir, args.force)
    results = experiment.run(run_dir)
    if main:
        print(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


def _sampler_override(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """``--sampler`` / ``--steps`` as an override of the experiment's sampler (either may be alone)."""
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be a positive integer, got {args.steps}")
    override = {}
    if args.sampler:
        override["name"] = args.sampler
    if args.steps is not None:
        override["steps"] = args.steps
    return override or None


def cmd_sample(args: argparse.Namespace) -> int:

    from .files import atomic_open, atomic_torch_save

    if args.num_samples < 1:
        raise InputError(f"--num-samples must be a positive integer, got {args.num_samples}")
    if not os.path.isfile(args.run_dir):
        _load_run(args.run_dir)  # a missing or broken run directory is named first
    default_out = (os.path.splitext(args.run_dir)[0] + "_samples.pt" if os.path.isfile(args.run_dir)
                   else os.path.join(args.run_dir, "samples.pt"))
    out = args.output or default_out
    experiment = None
    if not os.path.isfile(args.run_dir):
        cfg = _load_run(args.run_dir)
        _apply_runtime(cfg)
        experiment = build_experiment(cfg)
    formats = (".pt", ".npy") + tuple(getattr(experiment, "sample_formats", ()))
    if not out.endswith(formats):
        raise InputError(f"--output must end in {', '.join(formats)}, got {out}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise InputError(f"the output folder {os.path.dirname(out) or '.'} does not exist")
    sampler = _sampler_override(args)
    if experiment is None:  # a self-describing model file
        if args.model:
            raise InputError("--model selects a model of a run directory; a model file is sampled directly")
        if args.cond is not None:
            raise InputError("--cond needs a run directory (its experiment reads the condition)")
        x = _sample_model_file(args.run_dir, args.num_samples, sampler, args.seed)
    else:
        extra = {"cond": args.cond} if args.cond is not None else {}
        try:
            x = experiment.sample(args.run_dir, args.num_samples, model=args.model, sampler=sampler, seed=args.seed,
                                  **extra)
        except (TypeError, NotImplementedError) as err:
            raise RecipeError(f"cannot sample {args.model or 'the default model'} with sampler {sampler}"
                              f"{' and --cond' if extra else ''}: {err}") from err
    from .experiment import SampleRecord

    record = x if isinstance(x, SampleRecord) else SampleRecord(x=x)
    x = record.x
    if experiment is not None and out.endswith(tuple(getattr(experiment, "sample_formats", ()))):
        experiment.write_samples(record, out)
        print(f"wrote {len(record)} samples to {out}")
        return 0
    if out.endswith(".npy"):
        import numpy as np

        if record.mask is not None:
            raise InputError("variable-size samples (with a mask) are saved as .pt, not .npy")
        with atomic_open(out, "wb") as f:
            np.save(f, x.numpy())
    else:
        atomic_torch_save(record.to_file_object(), out)
    figure = os.path.splitext(out)[0] + ".png"
    from .figures import is_image_batch, save_image_grid

    if x.dim() == 2 and x.shape[1] == 2:
        _scatter(x, figure, title=args.model or "samples")
    elif is_image_batch(x):
        save_image_grid(x[:256], figure)
    else:
        figure = None
    print(f"wrote {tuple(x.shape)} samples to {out}" + (f" (figure: {figure})" if figure else ""))
    return 0


def _sample_model_file(file: str, num_samples: int, sampler: Optional[dict[str, Any]], seed: int):
    """Samples of a self-describing model file (no recipe, no domain code): Gaussian noise of the
    stored sample shape, pushed through the stored path by the chosen sampler (default Heun, 50 steps)."""
    from .models import load_model
    from .sampling import initial_noise, sampler_from_config

    model = load_model(file)
    if model.sample_shape is None:
        raise InputError(f"model file {file} stores no sample shape: cannot draw its initial noise")
    if getattr(model.net, "cond_dim", 0):
        raise InputError(f"model file {file} holds a conditional model (cond_dim={model.net.cond_dim}); sample it "
                         f"from Python with a condition, or through its run directory")
    smp = sampler_from_config({"name": "heun", "steps": 50, **(model.meta.get("sampler") or {})}, sampler)
    return smp.sample(model.predictor(), initial_noise(num_samples, model.sample_shape, seed=seed)).x


def _scatter(x, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    x = x.detach().cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_title(title)
    from .files import save_figure

    save_figure(fig, path, dpi=90)
    plt.close(fig)


def cmd_eval(args: argparse.Namespace) -> int:
    from .files import check_writable

    cfg = _load_run(args.run_dir)
    check_writable(args.run_dir, "run directory")  # fail now, not after the whole evaluation
    _apply_runtime(cfg)
    experiment = build_experiment(cfg)
    sampler = _sampler_override(args)
    kwargs = {"sampler": sampler} if sampler else {}
    try:
        results = experiment.evaluate(args.run_dir, **kwargs)
    except (TypeError, NotImplementedError) as err:
        raise RecipeError(f"cannot evaluate {args.run_dir} with sampler {sampler}: {err}") from err
    print(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


CORE_COMMANDS = ("run", "sample", "eval")


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The argument parser; with ``plugins``, installed domains' commands are added (see
    :data:`PLUGIN_GROUP`)."""
    parser = argparse.ArgumentParser(
        prog="energyflow",
        description="Energy-guided generative modelling: sample q(x) ∝ p(x)·exp(−β·E(x)) with models trained by "
                    "energy-weighted flow matching or diffusion.",
        epilog="Run 'energyflow COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train and evaluate a recipe (Hydra YAML)", description=(
        "Compose RECIPE with Hydra overrides, save the resolved config in a run directory, then build the "
        "recipe's experiment and run it (training stages are cached in the run directory, so rerunning resumes)."),
        epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", help="path to a recipe, e.g. recipes/toy_8gaussians.yaml")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. seed=1 experiment.betas=[1,3]")
    run.add_argument("--run-dir", help="output directory (default: runs/<recipe>/<timestamp>; reuse one to resume)")
    run.add_argument("--force", action="store_true", help="reuse a run directory even if its config differs")
    run.add_argument("-m", "--multirun", action="store_true", help=(
        "sweep: Hydra multirun over comma-separated values (seed=0,1,2 experiment.trainer.batch_size=64,256); one "
        "run directory per point under --run-dir (default runs/<recipe>/<timestamp>-sweep) plus summary.csv and "
        "summary.png; hydra/launcher=joblib runs points in parallel, hydra/launcher=submitit_slurm on SLURM"))
    run.set_defaults(func=cmd_run)

    sample = sub.add_parser("sample", help="draw samples from a trained run or a model file", description=(
        "Rebuild the experiment of RUN_DIR from its config.yaml and draw samples from one of its models, or "
        "sample a self-describing model file (RUN_DIR/models/<name>.pt) directly, without its recipe."))
    sample.add_argument("run_dir", metavar="RUN_DIR_OR_MODEL_FILE",
                        help="a run directory written by 'energyflow run', or a model file (.pt)")
    sample.add_argument("-n", "--num-samples", type=int, default=1000, help="number of samples (default 1000)")
    sample.add_argument("-m", "--model", help="which model, e.g. efm_ot_beta10, cep_beta3, fm_ot (default: the "
                        "experiment's main model)")
    sample.add_argument("-o", "--output", help="output file, .pt or .npy (default RUN_DIR/samples.pt), or a format the "
                        "experiment writes (.sdf for conformers); 2-D samples also get a .png scatter plot")
    sample.add_argument("--sampler", help="sampler name: euler, midpoint, heun, rk4, dopri5, em, ancestral, dpm")
    sample.add_argument("--steps", type=int, help="sampler steps (default: the recipe's)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sample.add_argument("--cond", help="what to sample for, read by the run's experiment (e.g. a SMILES string for the "
                        "conformer recipe)")
    sample.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluate a trained run", description=(
        "Rebuild the experiment of RUN_DIR and re-run its evaluation; prints the metrics as JSON."))
    ev.add_argument("run_dir", help="a run directory written by 'energyflow run'")
    ev.add_argument("--sampler", help="override the sampler for the evaluation")
    ev.add_argument("--steps", type=int, help="sampler steps (default: the recipe's)")
    ev.set_defaults(func=cmd_eval)

    if plugins:
        _add_plugin_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A core command needs no plugin: its process imports no domain's code.
    parser = build_parser(plugins=not (argv and argv[0] in CORE_COMMANDS))
    args, extra = parser.parse_known_args(argv)
    if extra:  # Hydra overrides may also follow the options of `run` (argparse stops at the first option)
        if getattr(args, "command", None) != "run" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (InputError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as err:
        # user-facing input errors (bad recipe, unknown model, missing run): one clear line, no traceback
        print(f"energyflow: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder, ...: what and where, in one line
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"energyflow: error: {err.strerror or _one_line(err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("energyflow: interrupted (checkpoints were saved; rerun with the same --run-dir to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
