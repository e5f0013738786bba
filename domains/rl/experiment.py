"""The offline-RL experiment behind ``recipes/qipo_*.yaml``: QIPO-OT, QIPO-Diff, QGPO and BC on a
Minari dataset (or a D4RL .hdf5 file), evaluated with the CORL protocol over several seeds.

Per seed, the run directory gets ``seed<k>/evals.jsonl`` (one line per evaluation: after the
behaviour model — that is BC — and after every QIPO renewal); at the end, ``results.json`` holds
the last and best normalised scores as mean ± std over seeds, and ``learning_curve.png`` plots them.
Stages (behaviour model, critic, QGPO energy, QIPO rounds) are cached in ``cache_dir`` keyed by
their configuration, so changing β or the number of rounds retrains neither μ nor the critic.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from energyflow.experiment import Experiment, write_json

__all__ = ["OfflineRLExperiment", "ALGOS"]

ALGOS = ("qipo_ot", "qipo_diff", "qgpo", "bc")


class OfflineRLExperiment(Experiment):
    """Offline RL with energy-weighted flow matching.

    Args:
        env_id: the Gymnasium environment evaluated on (e.g. ``"Walker2d-v5"``).
        dataset: a Minari id, a D4RL ``.hdf5`` path, or ``"default"`` (the dataset built from the
            behaviour checkpoints shipped in ``assets/``, created in the local Minari store on first use).
        algo: ``qipo_ot``, ``qipo_diff``, ``qgpo`` or ``bc``.
        qipo: :class:`~domains.rl.qipo.QIPOConfig` fields (``path`` is set from ``algo``).
        seeds: the seeds to run (results are mean ± std over them).
        eval_episodes, eval_seed: evaluation protocol (episode i of an evaluation resets with
            ``eval_seed + i``; the same episodes for every algorithm and round).
        reward_scale: rewards are multiplied by it before the critic (documents the Q scale).
        download: allow downloading a remote Minari id.
        cache_dir: where stages are cached (default ``<run_dir>/../cache``, shared by runs of a recipe).
        default_dataset: how to build ``"default"``: ``{"id", "actors", "steps_per_actor"}``.
        device, progress: as for the trainer.
    """

    def __init__(self, env_id: str = "Walker2d-v5", dataset: str = "default", algo: str = "qipo_ot",
                 qipo: Optional[dict] = None, seeds: Sequence[int] = (0,), eval_episodes: int = 10,
                 eval_seed: int = 1000, reward_scale: float = 1.0, download: bool = False,
                 cache_dir: Optional[str] = None, default_dataset: Optional[dict] = None,
                 device: str = "auto", progress: bool = True):
        if algo not in ALGOS:
            raise ValueError(f"unknown algo {algo!r}; choose one of {ALGOS}")
        self.env_id, self.dataset, self.algo = env_id, dataset, algo
        self.qipo_cfg = dict(qipo or {})
        self.seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])]
        self.eval_episodes, self.eval_seed = int(eval_episodes), int(eval_seed)
        self.reward_scale, self.download = float(reward_scale), bool(download)
        self.cache_dir, self.default_dataset = cache_dir, dict(default_dataset or {})
        self.device, self.progress = device, bool(progress)

    # -- data ------------------------------------------------------------------------------------------
    def load_data(self):
        """The dataset as :class:`~domains.rl.datasets.Transitions`, checked against the environment."""
        import gymnasium as gym

        from .datasets import load_dataset

        spec = self.dataset
        if spec == "default":
            spec = self.ensure_default_dataset()
        data = load_dataset(spec, download=self.download)
        env = gym.make(self.env_id)
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
    def _qipo(self, data, key: str, seed: int, cache_dir: str):
        from .qipo import QIPO, QIPOConfig

        fields = {f.name for f in dataclasses.fields(QIPOConfig)}
        unknown = set(self.qipo_cfg) - fields
        if unknown:
            raise ValueError(f"unknown qipo settings {sorted(unknown)}; valid: {sorted(fields)}")
        path = "vp" if self.algo in ("qipo_diff", "qgpo") else "ot"
        cfg = QIPOConfig(**{**self.qipo_cfg, "path": path, "seed": seed})
        if self.algo == "bc":
            cfg.rounds = 0
        return QIPO(data, cfg, cache_dir, dataset_key=key, device=self.device, progress=self.progress)

    def _evaluator(self, data, predictor_fn=None):
        from .evaluate import evaluate_policy

        def evaluate(policy, rnd: int) -> dict:
            g = torch.Generator().manual_seed(self.eval_seed)
            predictor = predictor_fn() if predictor_fn is not None else None
            start = time.perf_counter()
            res = evaluate_policy(lambda obs: policy.act(obs.to(policy.obs_mean.device), g, predictor=predictor),
                                  self.env_id, self.eval_episodes, self.eval_seed,
                                  data.ref_min_score, data.ref_max_score)
            where = f"round {rnd}" if rnd >= 0 else "final policy"
            print(f"  {where}: normalised score {res.score_mean:.1f} ± {res.score_std:.1f}")
            return {**res.as_dict(), "eval_seconds": round(time.perf_counter() - start, 2)}

        return evaluate

    def run_seed(self, data, key: str, seed: int, run_dir: str, cache_dir: str) -> list[dict]:
        seed_dir = os.path.join(run_dir, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        qipo = self._qipo(data, key, seed, cache_dir)
        timings = {}
        t0 = time.perf_counter()
        mu = qipo.behaviour()
        timings["behaviour"] = round(time.perf_counter() - t0, 1)
        if self.algo == "qgpo":
            t0 = time.perf_counter()
            predictor = qipo.qgpo_predictor(mu)
            timings["critic+qgpo"] = round(time.perf_counter() - t0, 1)
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
        with open(os.path.join(seed_dir, "evals.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        final = (qipo.rounds_stage.file(f"round{records[-1]['round']}/policy.pt")
                 if self.algo in ("qipo_ot", "qipo_diff") and records[-1]["round"] > 0
                 else qipo.behaviour_stage.file("policy.pt"))
        write_json({"records": records, "stage_seconds": timings, "final_policy": final,
                    "qgpo_energy": qipo.qgpo_stage.file("energy.pt") if self.algo == "qgpo" else None,
                    "stages": {"behaviour": qipo.behaviour_stage.path, "critic": qipo.critic_stage.path}},
                   os.path.join(seed_dir, "summary.json"))
        return records

    def evaluate(self, run_dir: str) -> dict[str, Any]:
        """Load each seed's final policy from ``run_dir`` and evaluate it again (same protocol)."""
        data, key = self.load_data()
        cache_dir = self._cache_dir(run_dir)
        scores = {}
        for seed in self.seeds:
            path = os.path.join(run_dir, f"seed{seed}", "summary.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: run the recipe first")
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
            qipo = self._qipo(data, key, seed, cache_dir)
            policy = qipo.new_policy()
            policy.load_state_dict(torch.load(summary["final_policy"], map_location=qipo.device))
            predictor_fn = (lambda: qipo.qgpo_predictor(policy)) if self.algo == "qgpo" else None
            record = self._evaluator(data, predictor_fn)(policy.eval(), -1)
            scores[seed] = record
        values = np.array([r["normalized_score"] for r in scores.values()])
        result = {"algo": self.algo, "per_seed": {str(k): v for k, v in scores.items()},
                  "normalized_score": {"mean": float(values.mean()), "std": float(values.std())}}
        write_json(result, os.path.join(run_dir, "eval.json"))
        return result

    def _cache_dir(self, run_dir: str) -> str:
        """Where stages are cached: ``cache_dir``, or ``cache/`` beside the run directory."""
        return self.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), "cache")

    def run(self, run_dir: str) -> dict[str, Any]:
        data, key = self.load_data()
        cache_dir = self._cache_dir(run_dir)
        per_seed = {}
        for seed in self.seeds:
            print(f"{self.algo} on {key}, seed {seed}")
            per_seed[seed] = self.run_seed(data, key, seed, run_dir, cache_dir)
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
        fig.savefig(path, dpi=90)
        plt.close(fig)
