"""``energyflow data``: the offline-RL dataset commands, a plugin of the ``energyflow`` command line.

The command is registered through the ``energyflow.commands`` entry point
(``data = "domains.rl.cli:register"`` in ``pyproject.toml``): the ``energyflow`` command calls
:func:`register` with its sub-parsers, and runs the parsed command's ``func(args)``, whose return
value is the exit code.  Nothing heavy is imported until the command runs.
"""
from __future__ import annotations

import argparse
import json

from energyflow.errors import InputError

__all__ = ["register", "cmd_data"]

DATA_COMMANDS = ("train-behaviour", "make", "make-replay", "list", "download")


def cmd_data(args: argparse.Namespace) -> int:
    """Run ``energyflow data DATA_COMMAND`` (needs the rl extra); returns the exit code."""
    try:
        from domains.rl import behaviour, datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError(f"'energyflow data' needs the rl extra: pip install 'energyflow[rl]' ({err})") from err
    command = getattr(args, "data_command", None)
    if command == "train-behaviour":
        records = behaviour.train_sac(args.env, args.steps, args.out, checkpoint_every=args.checkpoint_every,
                                      seed=args.seed, save_replay=args.save_replay)
        for r in records:
            print(json.dumps(r))
    elif command == "make":
        steps = args.steps_per_actor[0] if len(args.steps_per_actor) == 1 else args.steps_per_actor
        ds = datasets.make_mixed_dataset(args.dataset_id, args.actors, steps, env_id=args.env,
                                         seed=args.seed, overwrite=args.overwrite)
        print(f"created {args.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps")
    elif command == "make-replay":
        ds = datasets.make_replay_dataset(args.dataset_id, args.replay, args.env, overwrite=args.overwrite)
        print(f"created {args.dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} steps")
    elif command == "list":
        import minari

        for name in sorted(minari.list_local_datasets()):
            print(name)
    elif command == "download":
        datasets.load_minari(args.dataset_id, download=True)
        print(f"downloaded {args.dataset_id}")
    else:
        raise InputError(f"choose a data command: {', '.join(DATA_COMMANDS)} (see 'energyflow data --help')")
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``data`` command (and its sub-commands) to the ``energyflow`` sub-parsers."""
    data = subparsers.add_parser("data", help="build or fetch offline-RL datasets (Minari)", description=(
        "Offline-RL datasets in the local Minari store ($MINARI_DATASETS_PATH, default ~/.minari/datasets): train "
        "a behaviour policy with SAC, roll out its checkpoints into a dataset, list or download datasets."))
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    tb = dsub.add_parser("train-behaviour", help="train SAC and save actor checkpoints with their returns")
    tb.add_argument("--env", default="Walker2d-v5", help="Gymnasium id (default Walker2d-v5)")
    tb.add_argument("--steps", type=int, default=300_000,
                    help="environment steps (default 300000; ~60 steps/s on a CPU core)")
    tb.add_argument("--out", required=True, help="folder for actor_<steps>.pt and checkpoints.jsonl")
    tb.add_argument("--checkpoint-every", type=int, default=20_000)
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--save-replay", action="store_true",
                    help="also save SAC's replay buffer at each checkpoint as replay_<steps>.npz (~170 bytes per "
                         "transition on Walker2d): the source of a medium-replay dataset")
    mk = dsub.add_parser("make", help="roll out actor checkpoints (stochastic actions) into one Minari dataset")
    mk.add_argument("dataset_id", help="e.g. energyflow/walker2d-mixed-v0 (Minari ids need -vN)")
    mk.add_argument("--actors", nargs="+", required=True,
                    help="actor checkpoints (from train-behaviour, or the name of a shipped one such as "
                         "walker2d_sac_020k.pt); 'random' rolls out uniformly random actions")
    mk.add_argument("--steps-per-actor", type=int, nargs="+", default=[25_000],
                    help="steps per checkpoint (one value or one per actor)")
    mk.add_argument("--env", default=None, help="Gymnasium id (default: the checkpoints')")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--overwrite", action="store_true",
                    help="replace an existing dataset (the old one stays until the new one is complete)")
    rp = dsub.add_parser("make-replay", help="store a SAC replay buffer (train-behaviour --save-replay) as a "
                                             "medium-replay-style Minari dataset")
    rp.add_argument("dataset_id", help="e.g. energyflow/walker2d-medium-replay-v0")
    rp.add_argument("--replay", required=True, help="replay_<steps>.npz written by train-behaviour --save-replay")
    rp.add_argument("--env", required=True, help="the Gymnasium id SAC trained on, e.g. Walker2d-v5")
    rp.add_argument("--overwrite", action="store_true",
                    help="replace an existing dataset (the old one stays until the new one is complete)")
    dsub.add_parser("list", help="list the datasets in the local Minari store")
    dl = dsub.add_parser("download", help="download a remote Minari dataset (needs internet)")
    dl.add_argument("dataset_id", help="e.g. mujoco/walker2d/medium-v0")
    data.set_defaults(func=cmd_data)
