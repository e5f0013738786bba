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

__all__ = ["main", "compose_recipe", "build_experiment"]

EPILOG_RUN = """examples:
  energyflow run recipes/toy_8gaussians.yaml
  energyflow run recipes/toy_8gaussians.yaml seed=1 experiment.betas=[1,5] experiment.trainer.steps=500
  energyflow run recipes/toy_8gaussians.yaml --run-dir runs/mine     # rerun to resume

Overrides use Hydra's syntax (key=value, +new_key=value, ~key).  The run directory receives the
resolved config.yaml, one folder per training stage (train/<stage>/ with metrics.jsonl, tensorboard
logs in tb/ and checkpoint.pt), the trained models (models/), results.json, eval.json and figures.
`energyflow run` is one process; for data-parallel training use the Trainer under torchrun.
"""


class RecipeError(RuntimeError):
    """A recipe that cannot be loaded, composed or instantiated."""


def compose_recipe(recipe: str, overrides: Sequence[str] = ()):
    """Compose a recipe file with Hydra overrides; returns an ``omegaconf.DictConfig``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = os.path.abspath(recipe)
    if not os.path.isfile(path):
        raise RecipeError(f"recipe not found: {recipe}")
    if not path.endswith((".yaml", ".yml")):
        raise RecipeError(f"a recipe is a .yaml file, got {recipe}")
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


def build_experiment(cfg) -> Any:
    """Instantiate ``cfg.experiment`` (an :class:`~energyflow.experiment.Experiment`)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from .experiment import Experiment

    try:
        experiment = instantiate(cfg.experiment, _convert_="all")
    except (InstantiationException, TypeError, ValueError, ImportError) as err:
        raise RecipeError(f"cannot build the experiment {cfg.experiment.get('_target_')}: {err}") from err
    if not isinstance(experiment, Experiment):
        raise RecipeError(f"{cfg.experiment._target_} is not an energyflow Experiment")
    return experiment


def _default_run_dir(recipe: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", os.path.splitext(os.path.basename(recipe))[0], stamp)


def _load_run(run_dir: str, overrides: Sequence[str] = ()):
    from omegaconf import OmegaConf

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise RecipeError(f"{run_dir} is not a run directory (no config.yaml); create one with 'energyflow run'")
    cfg = OmegaConf.load(cfg_path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def _apply_runtime(cfg) -> None:
    from .runtime import seed_everything, set_threads

    if cfg.get("num_threads"):
        set_threads(int(cfg.num_threads))
    seed_everything(int(cfg.get("seed", 0)))


def cmd_run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    cfg = compose_recipe(args.recipe, args.overrides)
    run_dir = args.run_dir or cfg.get("run_dir") or _default_run_dir(args.recipe)
    os.makedirs(run_dir, exist_ok=True)
    saved = os.path.join(run_dir, "config.yaml")
    if os.path.exists(saved) and OmegaConf.load(saved) != cfg and not args.force:
        raise RecipeError(f"{run_dir} holds a run with a different config; pick another --run-dir or pass --force")
    OmegaConf.save(cfg, saved)
    _apply_runtime(cfg)
    experiment = build_experiment(cfg)
    print(f"run directory: {run_dir}", file=sys.stderr)
    results = experiment.run(run_dir)
    print(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    cfg = _load_run(args.run_dir)
    _apply_runtime(cfg)
    experiment = build_experiment(cfg)
    sampler = {"name": args.sampler, "steps": args.steps} if args.sampler else None
    try:
        x = experiment.sample(args.run_dir, args.num_samples, model=args.model, sampler=sampler, seed=args.seed)
    except (TypeError, NotImplementedError) as err:
        raise RecipeError(f"cannot sample {args.model or 'the default model'} with sampler {args.sampler}: {err}") from err
    out = args.output or os.path.join(args.run_dir, "samples.pt")
    if out.endswith(".npy"):
        import numpy as np

        np.save(out, x.numpy())
    else:
        torch.save(x, out)
    if x.dim() == 2 and x.shape[1] == 2:
        _scatter(x, os.path.splitext(out)[0] + ".png", title=args.model or "samples")
    print(f"wrote {tuple(x.shape)} samples to {out}")
    return 0


def _scatter(x, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    x = x.detach().cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load_run(args.run_dir)
    _apply_runtime(cfg)
    experiment = build_experiment(cfg)
    kwargs = {"sampler": {"name": args.sampler, "steps": args.steps}} if args.sampler else {}
    try:
        results = experiment.evaluate(args.run_dir, **kwargs)
    except (TypeError, NotImplementedError) as err:
        raise RecipeError(f"cannot evaluate {args.run_dir} with sampler {args.sampler}: {err}") from err
    print(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Offline-RL datasets (needs the rl extra)."""
    try:
        from domains.rl import behaviour, datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RecipeError(f"'energyflow data' needs the rl extra: pip install 'energyflow[rl]' ({err})") from err
    if args.data_command == "train-behaviour":
        records = behaviour.train_sac(args.env, args.steps, args.out, checkpoint_every=args.checkpoint_every,
                                      seed=args.seed)
        for r in records:
            print(json.dumps(r))
    elif args.data_command == "make":
        steps = args.steps_per_actor[0] if len(args.steps_per_actor) == 1 else args.steps_per_actor
        ds = datasets.make_mixed_dataset(args.dataset_id, args.actors, steps, env_id=args.env,
                                         seed=args.seed, overwrite=args.overwrite)
        print(f"created {args.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps")
    elif args.data_command == "list":
        import minari

        for name in sorted(minari.list_local_datasets()):
            print(name)
    elif args.data_command == "download":
        datasets.load_minari(args.dataset_id, download=True)
        print(f"downloaded {args.dataset_id}")
    else:
        raise RecipeError("choose a data command: train-behaviour, make, list, download (see --help)")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    run.set_defaults(func=cmd_run)

    sample = sub.add_parser("sample", help="draw samples from a trained run", description=(
        "Rebuild the experiment of RUN_DIR from its config.yaml and draw samples from one of its models."))
    sample.add_argument("run_dir", help="a run directory written by 'energyflow run'")
    sample.add_argument("-n", "--num-samples", type=int, default=1000, help="number of samples (default 1000)")
    sample.add_argument("-m", "--model", help="which model, e.g. efm_ot_beta10, cep_beta3, fm_ot (default: the "
                        "experiment's main model)")
    sample.add_argument("-o", "--output", help="output file, .pt or .npy (default RUN_DIR/samples.pt); 2-D samples "
                        "also get a .png scatter plot")
    sample.add_argument("--sampler", help="sampler name: euler, midpoint, heun, rk4, dopri5, em, ancestral, dpm")
    sample.add_argument("--steps", type=int, default=50, help="sampler steps (with --sampler; default 50)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sample.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluate a trained run", description=(
        "Rebuild the experiment of RUN_DIR and re-run its evaluation; prints the metrics as JSON."))
    ev.add_argument("run_dir", help="a run directory written by 'energyflow run'")
    ev.add_argument("--sampler", help="override the sampler for the evaluation")
    ev.add_argument("--steps", type=int, default=50, help="sampler steps (with --sampler; default 50)")
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="build or fetch offline-RL datasets (Minari)", description=(
        "Offline-RL datasets in the local Minari store ($MINARI_DATASETS_PATH, default ~/.minari/datasets): train "
        "a behaviour policy with SAC, roll out its checkpoints into a dataset, list or download datasets."))
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    tb = dsub.add_parser("train-behaviour", help="train SAC and save actor checkpoints with their returns")
    tb.add_argument("--env", default="Walker2d-v5", help="Gymnasium id (default Walker2d-v5)")
    tb.add_argument("--steps", type=int, default=300_000, help="environment steps (default 300000; ~60 steps/s on a CPU core)")
    tb.add_argument("--out", required=True, help="folder for actor_<steps>.pt and checkpoints.jsonl")
    tb.add_argument("--checkpoint-every", type=int, default=20_000)
    tb.add_argument("--seed", type=int, default=0)
    mk = dsub.add_parser("make", help="roll out actor checkpoints (stochastic actions) into one Minari dataset")
    mk.add_argument("dataset_id", help="e.g. energyflow/walker2d-mixed-v0 (Minari ids need -vN)")
    mk.add_argument("--actors", nargs="+", required=True, help="actor checkpoints (from train-behaviour); 'random' rolls out uniformly random actions")
    mk.add_argument("--steps-per-actor", type=int, nargs="+", default=[25_000], help="steps per checkpoint (one value or one per actor)")
    mk.add_argument("--env", default=None, help="Gymnasium id (default: the checkpoints')")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--overwrite", action="store_true")
    dsub.add_parser("list", help="list the datasets in the local Minari store")
    dl = dsub.add_parser("download", help="download a remote Minari dataset (needs internet)")
    dl.add_argument("dataset_id", help="e.g. mujoco/walker2d/medium-v0")
    data.set_defaults(func=cmd_data)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
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
    except (RecipeError, FileNotFoundError, FileExistsError, ValueError) as err:
        # user-facing input errors (bad recipe, unknown model, missing run): one clear line, no traceback
        print(f"energyflow: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("energyflow: interrupted (checkpoints were saved; rerun with the same --run-dir to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
