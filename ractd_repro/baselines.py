"""Rows without a policy to roll out: "data", the dataset's own level (its complete episodes' normalized returns,
ractd.data.level), and "behavior", the generator's evaluation of the behavior policy where the file records it
(`baseline_rows`, no rollouts); and Fig. 3's R_psi samples of each method's actions on dataset states
(`reward_rows`)."""

from __future__ import annotations

import logging

import numpy as np

from ractd import RactdError
from ractd.tasks import get_task
from ractd_repro.jobs import load_policy, make_job
from ractd_repro.methods import get_method
from ractd_repro.models import plan_models
from ractd_repro.spec import Study, expand_methods
from ractd_repro.store import ResultsStore, checkpoint_hash, episode_rows

log = logging.getLogger(__name__)


def data_rows(task: str, data: dict, scale: str, source: str = "") -> list[dict]:
    """Episode rows of the "data" cell (one per complete dataset episode, or maze2d window: ractd.data.level) and
    of the "behavior" cell (one per behavior policy evaluation the generator recorded). Their checkpoint is the
    dataset's fingerprint; seed is the episode's (window's, policy's) index; the behavior rows' batch_size is the
    number of episodes the generator averaged (it stepped them together) and train_steps the policy's SAC step."""
    from ractd.data.level import behavior_evals, data_level
    from ractd.train import dataset_fingerprint

    t = get_task(task)
    fp = dataset_fingerprint(data)
    lvl = data_level(t, data)
    records = [{"task": task, "seed": int(i), "return": float(r), "normalized_score": float(x), "length": int(n),
                "time_per_action": float("nan"), "terminated": bool(te), "truncated": False, "batch_size": 1}
               for i, r, x, n, te in zip(lvl["index"], lvl["returns"], lvl["scores"], lvl["lengths"],
                                         lvl["terminated"])]
    meta = dict(checkpoint=fp, checkpoint_path=source, scale=scale, max_steps=t.max_episode_steps, nfe=0)
    rows = episode_rows(records, method="data", sampler="data", **meta)
    for k, b in enumerate(behavior_evals(t, data)):
        rec = {"task": task, "seed": k, "return": b["eval_return"], "normalized_score": b["normalized"],
               "length": -1, "time_per_action": float("nan"), "terminated": False, "truncated": False,
               "batch_size": b["episodes"]}
        rows += episode_rows([rec], method="behavior", sampler=f"generator-eval:{b['policy']}",
                             train_steps=b["step"], **meta)
    log.info("%s: data level over %d of %d episodes (%s)", task, len(records), lvl["n_episodes"], lvl["rule"])
    return rows


def baseline_rows(study: Study, store: ResultsStore) -> int:
    """Write the "data" and "behavior" rows of every task of the study (its dataset at study.data_scale, source
    auto) that the store lacks; returns the number of rows written. A task without a dataset is skipped (logged)."""
    from ractd.data.d4rl import load_dataset

    done = {k[:3] for k in store.done_keys()}
    written = 0
    for task in study.tasks:
        try:
            data = load_dataset(get_task(task), scale=study.data_scale)
        except RactdError as e:
            log.warning("%s: no data row (%s)", task, e)
            continue
        rows = data_rows(task, data, study.name, source=f"dataset {task} ({study.data_scale})")
        stored = {k[2] for k in done if k[0] == task and k[1] == "data"}
        if stored and rows and stored != {rows[0]["checkpoint"]}:
            raise RactdError(f"{task}: the store at {store.root} holds the data level of another dataset "
                             f"(fingerprint {', '.join(sorted(stored))}, now {rows[0]['checkpoint']}); a task's cells "
                             "must share one dataset: use a new store (--out) or the dataset they were measured on")
        rows = [r for r in rows if (r["task"], r["method"], r["checkpoint"]) not in done]
        store.write_episodes(rows)
        written += len(rows)
    return written


FIG3_METHODS = ("teacher-heun-80", "ctd", "ractd")


def reward_rows(study: Study, store: ResultsStore, chunk: int = 256) -> int:
    """Fig. 3 data: on `study.fig3_states` dataset states (fixed draw), one action per method (teacher Heun-80,
    CTD, RACTD; state k's noise from torch.Generator().manual_seed(k)), scored by the task's R_psi; rows
    written to the store's rewards dataset. Locomotion tasks with a reward model only; cells already stored are
    skipped. Returns the number of rows written."""
    import torch

    from ractd.train import load_stage_model, prepare

    written = 0
    done = store.done_reward_keys()
    for task in study.tasks:
        if get_task(task).kind != "locomotion":
            continue
        models = plan_models(study, task)
        reward = models.get("reward")
        if reward is None or not reward.exists:
            continue
        wanted = [m for m in FIG3_METHODS if m in expand_methods(study, task) and models[get_method(m).model].exists]
        jobs = [make_job(task, m, models[get_method(m).model].checkpoint, study.name) for m in wanted]
        jobs = [j for j in jobs if not any(k[:3] == (task, j.method, j.checkpoint) for k in done)]
        if not jobs:
            continue
        r_model, r_cfg, r_ck = load_stage_model(reward.checkpoint)
        prep = prepare(r_cfg)
        if r_ck.get("meta", {}).get("dataset_fingerprint") not in (None, prep.fingerprint):
            raise RactdError(f"{reward.checkpoint} was trained on another dataset than {task} at this scale")
        n = min(study.fig3_states, len(prep.state))
        idx = np.sort(np.random.default_rng(0).choice(len(prep.state), size=n, replace=False))
        r_hash = checkpoint_hash(reward.checkpoint)
        for job in jobs:
            policy = load_policy(job)
            values = []
            for i in range(0, n, chunk):
                rows = idx[i:i + chunk]
                cond = torch.from_numpy(prep.cond[rows])
                gens = [torch.Generator().manual_seed(int(k)) for k in range(i, i + len(rows))]
                with torch.inference_mode():
                    x = policy.sampler(cond, gens)
                    a = x[:, 0].float().clamp(-1.0, 1.0)
                    values.append(r_model(torch.from_numpy(prep.state[rows]), a).reshape(-1).numpy())
            vals = np.concatenate(values)
            store.write_rewards([{"task": task, "method": job.method, "checkpoint": job.checkpoint, "state_index": k,
                                  "reward": float(v), "reward_checkpoint": r_hash, "scale": study.name}
                                 for k, v in enumerate(vals)])
            written += len(vals)
            log.info("Fig. 3 %s %s: mean R_psi %.4f over %d states", task, job.method, float(vals.mean()), n)
    return written
