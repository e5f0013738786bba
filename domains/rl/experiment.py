"""The offline-RL experiment behind ``recipes/qipo_*.yaml``: QIPO-OT, QIPO-Diff, QGPO and BC on a
Minari dataset (or a D4RL .hdf5 file), evaluated with the CORL protocol over several seeds.

Per seed, the run directory gets ``seed<k>/evals.jsonl`` (one line per evaluation: after the
behaviour model — that is BC — and after every QIPO renewal); at the end, ``results.json`` holds
the last and best normalised scores as mean ± std over seeds, and ``learning_curve.png`` plots them.
Stages (behaviour model, critic, QGPO energy, QIPO rounds) are cached in ``cache_dir`` keyed by
their configuration, so changing β or the number of rounds retrains neither μ nor the critic.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from energyflow.errors import InputError
from energyflow.validation import check_integer, check_number
from energyflow.experiment import Experiment
from energyflow.files import check_writable, copy_file, read_json, write_json, write_text

__all__ = ["OfflineRLExperiment", "ALGOS"]

ALGOS = ("qipo_ot", "qipo_diff", "qgpo", "bc", "qipo_onestep")


def _seed_list(seeds: Any) -> list[int]:
    values = seeds if isinstance(seeds, (list, tuple)) else [seeds]
    out = []
    for s in values:
        if isinstance(s, float) and s.is_integer():
            s = int(s)
        if isinstance(s, bool) or not isinstance(s, int):
            raise InputError(f"experiment.seeds must be a list of integers, got {seeds!r}")
        out.append(s)
    if not out or len(set(out)) != len(out):
        raise InputError(f"experiment.seeds must be a non-empty list of distinct integers, got {seeds!r}")
    return out


class OfflineRLExperiment(Experiment):
    """Offline RL with energy-weighted flow matching.

    Args:
        env_id: the Gymnasium environment evaluated on (e.g. ``"Walker2d-v5"``).
        dataset: a Minari id, a D4RL ``.hdf5`` path, or ``"default"`` (the dataset built from the
            behaviour checkpoints shipped with the package, created in the local Minari store on first use).
        algo: ``qipo_ot``, ``qipo_diff``, ``qgpo``, ``bc``, or ``qipo_onestep`` (QIPO-OT, then its
            final policy distilled into one network evaluation per action; its last record).
        qipo: :class:`~domains.rl.qipo.QIPOConfig` fields (``path`` is set from ``algo``, ``seed``
            from ``seeds``).
        seeds: the seeds to run (results are mean ± std over them).
        eval_episodes, eval_seed: evaluation protocol (episode i of an evaluation resets with
            ``eval_seed + i``; the same episodes for every algorithm and round).
        reward_scale: rewards are multiplied by it before the critic (documents the Q scale).
        download: allow downloading a remote Minari id.
        cache_dir: where stages are cached (default ``<run_dir>/../cache``, shared by runs of a recipe).
        default_dataset: how to build ``"default"``: ``{"id", "actors", "steps_per_actor"}``.
        device, progress: as for the trainer.

    Every argument is checked here, before any data is loaded or anything trained: a bad value
    raises :class:`~energyflow.errors.InputError` naming its recipe key (``experiment.qipo.beta``…).
    """

    def __init__(self, env_id: str = "Walker2d-v5", dataset: str = "default", algo: str = "qipo_ot",
                 qipo: Optional[dict] = None, seeds: Sequence[int] = (0,), eval_episodes: int = 10,
                 eval_seed: int = 1000, reward_scale: float = 1.0, download: bool = False,
                 cache_dir: Optional[str] = None, default_dataset: Optional[dict] = None,
                 device: str = "auto", progress: bool = True):
        if algo not in ALGOS:
            raise InputError(f"experiment.algo must be one of {', '.join(ALGOS)}, got {algo!r}")
        for name, value in (("env_id", env_id), ("dataset", dataset), ("device", device)):
            if not isinstance(value, str) or not value:
                raise InputError(f"experiment.{name} must be a non-empty string, got {value!r}")
        for name, value in (("download", download), ("progress", progress)):
            if not isinstance(value, bool):
                raise InputError(f"experiment.{name} must be true or false, got {value!r}")
        if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
            raise InputError(f"experiment.cache_dir must be a folder path or null, got {cache_dir!r}")
        if default_dataset is not None and not isinstance(default_dataset, dict):
            raise InputError(f"experiment.default_dataset must be a mapping (id, actors, steps_per_actor), "
                             f"got {default_dataset!r}")
        eval_episodes = check_integer(eval_episodes, "experiment.eval_episodes", minimum=1)
        eval_seed = check_integer(eval_seed, "experiment.eval_seed")
        reward_scale = check_number(reward_scale, "experiment.reward_scale", low=0.0, low_inclusive=False)
        if qipo is not None and not isinstance(qipo, dict):
            raise InputError(f"experiment.qipo must be a mapping of QIPO settings, got {qipo!r}")
        for name, source in (("path", "experiment.algo"), ("seed", "experiment.seeds")):
            if name in (qipo or {}):
                raise InputError(f"experiment.qipo.{name} is set from {source}; remove it")
        self.env_id, self.dataset, self.algo = env_id, dataset, algo
        self.qipo_cfg = dict(qipo or {})
        self.seeds = _seed_list(seeds)
        self.eval_episodes, self.eval_seed = eval_episodes, eval_seed
        self.reward_scale, self.download = float(reward_scale), download
        self.cache_dir, self.default_dataset = cache_dir, dict(default_dataset or {})
        self.device, self.progress = device, progress
        self._config(self.seeds[0])  # every QIPO setting checked now, not after the first stages trained
        _check_env_id(self.env_id)

    # -- data ------------------------------------------------------------------------------------------
    def load_data(self):
        """The dataset as :class:`~domains.rl.datasets.Transitions` (rewards scaled by ``reward_scale``),
        checked against the environment, and the dataset's name."""
        from .datasets import load_dataset, make_env

        spec = self.dataset
        if spec == "default":
            spec = self.ensure_default_dataset()
        data = load_dataset(spec, download=self.download)
        env = make_env(self.env_id)
        data.check_spaces(env.observation_space, env.action_space)
        env.close()
        if self.reward_scale != 1.0:
            data = data.scaled_rewards(self.reward_scale)
        return data, spec

    def ensure_default_dataset(self) -> str:
        """Build the default dataset from behaviour checkpoints if it is not in the Minari store.

        ``default_dataset.actors`` entries are ``random``, the file name of a checkpoint shipped with
        the package (``walker2d_sac_020k.pt``, see :data:`~domains.rl.behaviour.CHECKPOINT_DIR`) or a
        path (absolute, or relative to the working directory).  Every entry is resolved before any
        rollout, so a missing checkpoint fails at once; the build itself is all-or-nothing.
        """
        from energyflow.errors import InputError

        from .behaviour import resolve_actor_path
        from .datasets import RANDOM_ACTOR, DatasetExistsError, _local_dataset_dir, make_mixed_dataset

        cfg = self.default_dataset
        dataset_id = cfg.get("id", "energyflow/walker2d-mixed-v1")
        built = lambda: os.path.isdir(os.path.join(str(_local_dataset_dir(dataset_id)), "data"))  # noqa: E731
        if not built():
            actors = cfg.get("actors") or []
            if not actors:
                raise InputError("experiment.default_dataset.actors is empty: list the behaviour checkpoints "
                                 "(or 'random') that build the default dataset")
            paths = [a if a == RANDOM_ACTOR else resolve_actor_path(a) for a in actors]
            print(f"building {dataset_id} from {len(paths)} behaviour checkpoints (first run only)")
            try:
                make_mixed_dataset(dataset_id, paths, cfg.get("steps_per_actor", 25000), env_id=self.env_id,
                                   seed=int(cfg.get("seed", 0)))
            except DatasetExistsError:
                if not built():  # not another run that built it meanwhile
                    raise
        return dataset_id

    # -- running ---------------------------------------------------------------------------------------
    def _config(self, seed: int):
        """The checked :class:`~domains.rl.qipo.QIPOConfig` of one seed."""
        from .qipo import QIPOConfig

        path = "vp" if self.algo in ("qipo_diff", "qgpo") else "ot"
        cfg = QIPOConfig.from_dict({**self.qipo_cfg, "path": path, "seed": seed}, where="experiment.qipo")
        if self.algo == "bc":
            cfg.rounds = 0
        return cfg

    def _qipo(self, data, seed: int, cache_dir: str, fingerprints: Optional[dict] = None):
        from .qipo import QIPO

        return QIPO(data, self._config(seed), cache_dir, device=self.device, progress=self.progress,
                    fingerprints=fingerprints, reward_scale=self.reward_scale)

    def reference_scores(self, data) -> tuple[Optional[float], Optional[float]]:
        """The ``(random, expert)`` returns that normalise scores: D4RL's for the evaluated
        environment whenever D4RL has them (:data:`~domains.rl.datasets.REF_SCORES`), whatever the
        dataset's metadata says (Minari's remote datasets carry their own, different references);
        the dataset's only for environments D4RL does not cover."""
        from .datasets import ref_scores_for

        try:
            return ref_scores_for(self.env_id)
        except KeyError:
            return data.ref_min_score, data.ref_max_score

    def _evaluator(self, data, predictor_fn=None, sampler: Optional[dict] = None):
        from .evaluate import evaluate_policy

        ref_min, ref_max = self.reference_scores(data)

        def evaluate(policy, rnd: int) -> dict:
            g = torch.Generator().manual_seed(self.eval_seed)
            predictor = predictor_fn() if predictor_fn is not None else None
            start = time.perf_counter()
            res = evaluate_policy(lambda obs: policy.act(obs.to(policy.obs_mean.device), g, predictor=predictor,
                                                         sampler=sampler),
                                  self.env_id, self.eval_episodes, self.eval_seed,
                                  ref_min, ref_max)
            where = f"round {rnd}" if rnd >= 0 else "final policy"
            print(f"  {where}: normalised score {res.score_mean:.1f} ± {res.score_std:.1f}")
            return {**res.as_dict(), "eval_seconds": round(time.perf_counter() - start, 2)}

        return evaluate

    def run_seed(self, data, key: str, seed: int, run_dir: str, cache_dir: str,
                 fingerprints: Optional[dict] = None) -> list[dict]:
        """Train (or read from the cache) and evaluate one seed; writes ``seed<k>/`` of the run directory:
        ``evals.jsonl``, ``summary.json`` and the final networks (``policy.pt``, and for QGPO
        ``qgpo_energy.pt``), so the run directory evaluates on its own, without the cache.  Both are
        self-describing model files (:func:`~domains.rl.policy.save_weights`): copies of the cached
        stage files, which :func:`energyflow.models.load_model` rebuilds without this package."""
        seed_dir = os.path.join(run_dir, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        qipo = self._qipo(data, seed, cache_dir, fingerprints)
        timings = {}
        t0 = time.perf_counter()
        mu = qipo.behaviour()
        timings["behaviour"] = round(time.perf_counter() - t0, 1)
        stages = {"behaviour": qipo.behaviour_stage}
        if self.algo == "qgpo":
            t0 = time.perf_counter()
            predictor = qipo.qgpo_predictor(mu)
            timings["critic+qgpo"] = round(time.perf_counter() - t0, 1)
            stages.update({"critic": qipo.critic_stage, "critic+qgpo": qipo.qgpo_stage})
            records = [{"round": 0, **self._evaluator(data, lambda: predictor)(mu, 0)}]
        elif self.algo == "bc":
            records = [{"round": 0, **self._evaluator(data)(mu, 0)}]
        else:
            t0 = time.perf_counter()
            qipo.critic(mu)
            timings["critic"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            records = qipo.run_rounds(evaluate=self._evaluator(data))
            timings["rounds"] = round(time.perf_counter() - t0, 1)
            stages.update({"critic": qipo.critic_stage, "rounds": qipo.rounds_stage})
        final_file = qipo.final_policy_file(records)
        if self.algo == "qipo_onestep":
            t0 = time.perf_counter()
            student = qipo.onestep(records)
            timings["onestep"] = round(time.perf_counter() - t0, 1)
            stage = qipo.onestep_stage(records[-1]["round"])
            stages["onestep"] = stage
            final_file = stage.file("policy.pt")
            print("  one-step policy (distilled from the last round):")
            records = records + [{"round": records[-1]["round"] + 1, "policy": "onestep",
                                  **self._evaluator(data)(student, records[-1]["round"] + 1)}]
        write_text("".join(json.dumps(r) + "\n" for r in records), os.path.join(seed_dir, "evals.jsonl"))
        copy_file(final_file, os.path.join(seed_dir, "policy.pt"))
        if self.algo == "qgpo":
            copy_file(qipo.qgpo_stage.file("energy.pt"), os.path.join(seed_dir, "qgpo_energy.pt"))
        # paths relative to the run directory; stages by their folder name in the cache (never absolute)
        write_json({"records": records, "stage_seconds": timings,
                    "final_policy": f"seed{seed}/policy.pt", "final_round": records[-1]["round"],
                    "qgpo_energy": f"seed{seed}/qgpo_energy.pt" if self.algo == "qgpo" else None,
                    "stages": {name: os.path.basename(stage.folder) for name, stage in stages.items()},
                    "stage_compute_seconds": {name: stage.summary.get("seconds") for name, stage in stages.items()},
                    "dataset": key, "dataset_fingerprint": qipo.fingerprints},
                   os.path.join(seed_dir, "summary.json"))
        return records

    def evaluate(self, run_dir: str, sampler: Optional[dict] = None) -> dict[str, Any]:
        """Load each seed's final policy from ``run_dir`` (``seed<k>/policy.pt``, written by :meth:`run`)
        and evaluate it again with the same protocol; the stage cache is not needed, so a copied or
        moved run directory evaluates too.  ``sampler`` overrides the policy's sampler."""
        from energyflow.runtime import resolve_device

        from .policy import load_weights
        from .qipo import ONE_STEP_SAMPLER, guided_predictor, make_energy_net, make_policy

        check_writable(run_dir, what="run directory")  # eval.json goes there: fail before the work
        summaries = {}
        for seed in self.seeds:
            path = os.path.join(run_dir, f"seed{seed}", "summary.json")
            if not os.path.exists(path):
                raise InputError(f"{path} is missing: run the recipe first (energyflow run)")
            summaries[seed] = read_json(path, what=f"summary of seed {seed}")
        data, _ = self.load_data()
        device = resolve_device(self.device)
        scores = {}
        for seed, summary in summaries.items():
            cfg = self._config(seed)

            def weights_file(key: str) -> str:
                rel = summary.get(key) if isinstance(summary, dict) else None
                if not isinstance(rel, str) or not rel:
                    raise InputError(f"{os.path.join(run_dir, f'seed{seed}', 'summary.json')} has no {key!r} "
                                     f"(written by an unfinished or older run); rerun the recipe")
                return os.path.join(run_dir, rel)

            policy = make_policy(cfg, data.obs_dim, data.act_dim,
                                 sampler=ONE_STEP_SAMPLER if self.algo == "qipo_onestep" else None).to(device)
            load_weights(policy, weights_file("final_policy"), f"final policy of seed {seed}", map_location=device)
            predictor_fn = None
            if self.algo == "qgpo":
                net = make_energy_net(cfg, data.obs_dim, data.act_dim).to(device)
                load_weights(net, weights_file("qgpo_energy"), f"QGPO energy network of seed {seed}", map_location=device)
                predictor = guided_predictor(policy.eval(), net, cfg)
                predictor_fn = lambda predictor=predictor: predictor  # noqa: E731
            scores[seed] = self._evaluator(data, predictor_fn, sampler)(policy.eval(), -1)
        values = np.array([r["normalized_score"] for r in scores.values()])
        result = {"algo": self.algo, "per_seed": {str(k): v for k, v in scores.items()},
                  "normalized_score": {"mean": float(values.mean()), "std": float(values.std())}}
        write_json(result, os.path.join(run_dir, "eval.json"))
        return result

    def _cache_dir(self, run_dir: str) -> str:
        """Where stages are cached: ``cache_dir``, or ``cache/`` beside the run directory."""
        return self.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), "cache")

    def run(self, run_dir: str) -> dict[str, Any]:
        from .qipo import transitions_fingerprint

        cache_dir = self._cache_dir(run_dir)
        check_writable(run_dir, what="run directory")
        check_writable(cache_dir, what="stage cache")
        data, key = self.load_data()
        fingerprints = transitions_fingerprint(data)  # once per run: the stages' keys hold the data's contents
        per_seed = {}
        for seed in self.seeds:
            print(f"{self.algo} on {key}, seed {seed}")
            per_seed[seed] = self.run_seed(data, key, seed, run_dir, cache_dir, fingerprints)
        results = self.summarize(per_seed)
        write_json(results, os.path.join(run_dir, "results.json"))
        self.plot(per_seed, os.path.join(run_dir, "learning_curve.png"))
        return results

    def summarize(self, per_seed: dict[int, list[dict]]) -> dict[str, Any]:
        """Last and best normalised score per seed, and their mean ± std over seeds."""
        last = np.array([recs[-1]["normalized_score"] for recs in per_seed.values()])
        best = np.array([max(r["normalized_score"] for r in recs) for recs in per_seed.values()])
        return {"algo": self.algo, "env_id": self.env_id, "dataset": self.dataset, "seeds": list(per_seed),
                "last": {"mean": float(last.mean()), "std": float(last.std()), "per_seed": last.tolist()},
                "best": {"mean": float(best.mean()), "std": float(best.std()), "per_seed": best.tolist()},
                "curves": {str(s): [r["normalized_score"] for r in recs] for s, recs in per_seed.items()}}

    def plot(self, per_seed: dict[int, list[dict]], path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for seed, recs in per_seed.items():
            ax.plot([r["round"] for r in recs], [r["normalized_score"] for r in recs], marker="o", label=f"seed {seed}")
        ax.set_xlabel("QIPO round (0 = behaviour policy / BC)")
        ax.set_ylabel("D4RL normalised score")
        ax.set_title(f"{self.algo} on {self.dataset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        from energyflow.files import save_figure

        save_figure(fig, path, dpi=90)
        plt.close(fig)


def _check_env_id(env_id: str) -> None:
    """Refuse an unknown Gymnasium id at construction (the registry lookup builds no environment)."""
    import gymnasium as gym

    from .datasets import make_env

    try:
        gym.spec(env_id)
    except gym.error.Error:
        make_env(env_id).close()  # raises the one-line UnknownEnvironmentError (with a suggestion)
