"""The evaluation study: which tasks x methods x samplers to evaluate, which checkpoint each cell needs, and
how a cell's block of seeds turns into stored episode rows. No Ray here (ractd_ray.pool runs the blocks in
parallel; `evaluate_serial` runs them in this process).

Methods (METHODS; the tables in ractd.results refer to these ids):
  teacher-heun-80        EDM teacher, Heun over 80 bins (Tables 1, 3, 11)
  ddpm-100, ddpm-15      DDPM baseline, ancestral sampling (Tables 3, 11)
  ddim-10, ddim-15, ddim-1   DDIM (eta 0) from the same DDPM model (Tables 3, 11)
  ctd                    one-step student distilled with sigma = 0 (Tables 2, 4, 11; Fig. 3)
  ractd                  one-step student with the RACTD weights: the best of `tune/search.py` when
                         ractd.paths.sweep_dir(task, data scale)/best_config.json exists, else Table 9
  ractd-invdyn           maze2d: the RACTD student's plan tracked by the inverse dynamics model (Table 2),
                         closed loop (observed state -> next waypoint)
  ractd-invdyn-plan      the same, open loop: actions between consecutive planned states (the paper's Sec. 4.2)
  ractd-nfe2/3/4         the RACTD student sampled with 2-4 steps (Table 5)
  ra-teacher-ctd, ra-teacher-ractd   students of a reward-aware teacher (Tables 4, 10)
  ractd-sigma-S          students with reward weight S (the sigma sweep, Fig. 4); a plan's "sigma-sweep"
                         entry expands to one per Study.sigmas
  ctd-final, ractd-final the same students' final checkpoints (<stage>/latest/checkpoint.pt at the last step),
                         beside the selected best.pt the other cells use: the tables show both, labeled
  bc                     behavior cloning (CORL's BC, ractd.train stage "bc"; maze2d: goal-conditioned, closed
                         loop), trained on the same dataset: a baseline row in every table

Baseline rows without a policy (`baseline_rows`, no rollouts): "data", the dataset's own level (its complete
episodes' normalized returns, ractd.data.level), and "behavior", the generator's evaluation of the behavior
policy where the file records it.

Checkpoints. Each method needs a model (ModelPlan): reward, teacher, ddpm, ctd, ractd, sigma-S, ra-teacher,
ra-teacher-ctd, ra-teacher-ractd, bc; ctd-final and ractd-final are files their student's training writes. Models live under ractd.paths.runs_dir()/study/<task>-<study name>/<model>/
<stage>/best.pt, except that when the sweep has run, RACTD is the sweep's best checkpoint, the teacher and
reward model are the ones it distilled from (best_config.json), so the study's other students distill from the
same teacher, and CTD is the sweep's completed trial at alpha = beta = 1, sigma = 0 when there is one. A model
whose training config equals another's (e.g. maze2d RACTD with sigma = 0 and CTD) shares its checkpoint. A missing checkpoint is trained with `ensure_models(study, trainer)`
(ractd.train.train by default; eval/reproduce_tables.py passes Ray Train when a cluster is there) or reported
with the exact `python -m ractd ...` command that trains it (`ModelPlan.command`); its cells are marked missing
and no number is ever made up for them.

Studies (STUDIES): "quick" (the README's first command: maze2d-umaze, quick budget, reusing the quick sweep),
"demo" (minutes: tiny datasets, every figure; docs/figures),
"default" (CPU scale: maze2d-umaze and hopper-medium-replay, small datasets, CPU budget; every table and
figure), "paper" (every task of Tables 1, 2, 11 and the ablation tasks of Tables 3-5, 10 at the paper budget).
The study name is the scale label stored with each episode and printed in every table cell.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ractd import RactdError
from ractd.results import PAPER_FIG4_SIGMAS, ResultsStore, checkpoint_hash, episode_rows, library_versions
from ractd.tasks import get_task

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Method:
    """One evaluated column: label, the model (ModelPlan name) whose checkpoint it samples, sampler and NFE;
    tracker (maze2d): how the planned states become actions, pd (Diffuser's PD rule) or inverse_dynamics (the
    paper's Sec. 4.2, ractd.inverse_dynamics)."""

    id: str
    label: str
    model: str
    sampler: str
    nfe: int
    tracker: str = "pd"


METHODS: dict[str, Method] = {m.id: m for m in [
    Method("teacher-heun-80", "Teacher Heun-80", "teacher", "heun", 80),
    Method("ddpm-100", "DDPM 100", "ddpm", "ddpm", 100),
    Method("ddpm-15", "DDPM 15", "ddpm", "ddpm", 15),
    Method("ddim-10", "DDIM 10", "ddpm", "ddim", 10),
    Method("ddim-15", "DDIM 15", "ddpm", "ddim", 15),
    Method("ddim-1", "DDIM 1", "ddpm", "ddim", 1),
    Method("ctd", "CTD", "ctd", "student", 1),
    Method("ractd", "RACTD", "ractd", "student", 1),
    Method("ractd-invdyn", "RACTD, inverse dynamics (closed loop)", "ractd", "student", 1, "inverse_dynamics"),
    Method("ractd-invdyn-plan", "RACTD, inverse dynamics on the plan (open loop)", "ractd", "student", 1,
           "inverse_dynamics_plan"),
    Method("ractd-nfe2", "RACTD 2-step", "ractd", "student", 2),
    Method("ractd-nfe3", "RACTD 3-step", "ractd", "student", 3),
    Method("ractd-nfe4", "RACTD 4-step", "ractd", "student", 4),
    Method("ra-teacher-ctd", "RA teacher + CTD", "ra-teacher-ctd", "student", 1),
    Method("ra-teacher-ractd", "RA teacher + RACTD", "ra-teacher-ractd", "student", 1),
    Method("ctd-final", "CTD, final checkpoint", "ctd-final", "student", 1),
    Method("ractd-final", "RACTD, final checkpoint", "ractd-final", "student", 1),
    Method("bc", "BC", "bc", "bc", 1),
]}
SIGMA_SWEEP = "sigma-sweep"
# methods that need the reward model R_psi (locomotion only; maze2d uses sigma = 0 and no reward model)
NEEDS_REWARD = {"ra-teacher-ctd", "ra-teacher-ractd", SIGMA_SWEEP}
# methods that need a planner (maze2d only)
MAZE_ONLY = {m.id for m in METHODS.values() if m.tracker != "pd"}


def sigma_method(sigma: float) -> Method:
    return Method(f"ractd-sigma-{sigma:g}", f"sigma = {sigma:g}", f"sigma-{sigma:g}", "student", 1)


def get_method(mid: str) -> Method:
    if mid in METHODS:
        return METHODS[mid]
    if mid.startswith("ractd-sigma-"):
        try:
            return sigma_method(float(mid.removeprefix("ractd-sigma-")))
        except ValueError:
            pass
    raise RactdError(f"unknown method {mid!r}; known: {', '.join(METHODS)}, ractd-sigma-S, {SIGMA_SWEEP}")


# ---------------------------------------------------------------------------------------------- the spec

CORE = ("teacher-heun-80", "ctd", "ractd")
# beside every task's methods: behavior cloning, and the final checkpoints of the selected students
BASELINES = ("bc", "ctd-final", "ractd-final")
LOCO_SAMPLERS = ("ddpm-15", "ddim-15")                      # Table 3
MAZE_SAMPLERS = ("ddpm-100", "ddim-10", "ddim-1")           # Table 11
MULTISTEP = ("ractd-nfe2", "ractd-nfe3", "ractd-nfe4")      # Table 5
REWARD_AWARE_TEACHER = ("ra-teacher-ctd", "ra-teacher-ractd")  # Tables 4, 10


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """The methods evaluated on one task (METHODS ids, or "sigma-sweep"); sigmas: this task's reward weights of
    the sigma sweep (() = the study's)."""

    task: str
    methods: tuple[str, ...]
    sigmas: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Study:
    """A declarative evaluation study.

    name: scale label stored with every episode and printed in every measured table cell.
    budget: training budget of missing checkpoints (ractd.train.BUDGETS: cpu | quick | paper).
    data_scale: dataset scale (tiny | small | full; a real D4RL file is used where present, source "auto").
    plans: the tasks and their methods.
    seeds: evaluation seeds 0 .. seeds - 1 per cell (the paper: 100).
    sigmas: reward weights of the sigma sweep (paper Fig. 4).
    ra_teacher_weight: reward weight of the reward-aware teacher (Tables 4, 10; the paper does not give it);
        < 0 = the task's RACTD sigma.
    train_missing: train missing checkpoints (else print their commands and mark the cells missing).
    fig3_states: dataset states on which Fig. 3 samples one action per method.
    costly_seeds: seeds (the first of 0 .. seeds - 1) of cells whose sampler makes more than 4 network calls
        per action (teacher Heun-80: 158, DDPM, DDIM 10/15) on locomotion, where every env step replans; 0 = seeds.
        On CPU such a cell costs 15-158x a one-step student's (Heun-80 on 100 seeds x 1000 steps: hours), so a
        CPU study may give it fewer seeds; each table cell prints its n.
    sweep_flags: ((task, tune/search.py flags), ...): the study's models come from these sweeps; a missing cell
        of such a task prints the sweep command instead of a `python -m ractd` one.
    preset: U-Net preset of every network ("" = the budget's).
    max_train_steps: cap on every stage's training steps (0 = the budget's).
    """

    name: str
    budget: str
    data_scale: str
    plans: tuple[TaskPlan, ...]
    seeds: int = 100
    sigmas: tuple[float, ...] = PAPER_FIG4_SIGMAS
    ra_teacher_weight: float = -1.0
    train_missing: bool = False
    fig3_states: int = 512
    costly_seeds: int = 0
    sweep_flags: tuple[tuple[str, str], ...] = ()
    preset: str = ""
    max_train_steps: int = 0

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(p.task for p in self.plans)

    def only(self, tasks: Iterable[str]) -> "Study":
        """The study restricted to `tasks` (a task the study does not plan gets the core methods)."""
        tasks = list(tasks)
        for t in tasks:
            get_task(t)
        known = {p.task: p for p in self.plans}
        plans = tuple(known.get(t, TaskPlan(t, CORE + BASELINES)) for t in tasks)
        return dataclasses.replace(self, plans=plans)


_LOCO_FULL = CORE + LOCO_SAMPLERS + MULTISTEP + REWARD_AWARE_TEACHER + (SIGMA_SWEEP,) + BASELINES
_MAZE_FULL = CORE + MAZE_SAMPLERS + BASELINES

# The sweeps the claims study reads (`python tune/search.py --task T <flags>`), one per task: the CPU budget's
# reward model, a 2000-step teacher (2.2 steps/s at batch 256 on one core), 400-step students at batch 128, no
# ASHA stopping (every grid point runs to its end) and the sigma grid of Fig. 4 with CTD (sigma = 0) on
# hopper-medium-replay (the paper's Fig. 4 task); walker2d-medium runs its Table 9 point (sigma 0.4, evaluated as
# its sigma sweep, so that it is evaluated even when the sweep picks CTD) and CTD only. maze2d:
# the quick budget's teacher with the 32-64-128 U-Net (what the README's first command trains), its Table 9
# point (= CTD) and one TPE point.
CLAIMS_SWEEPS: dict[str, str] = {
    "hopper-medium-replay": "--scale small --teacher-steps 2000 --steps 400 --batch 128 --ckpt-every 100 "
                            "--grace-period 4 --sigmas 0 0.3 1.5 --num-samples 4",
    "walker2d-medium": "--scale small --teacher-steps 2000 --steps 400 --batch 128 --ckpt-every 100 "
                       "--grace-period 4 --sigmas 0 --num-samples 2",
    "maze2d-umaze": "--scale small --budget quick --preset small-maze --num-samples 2 --select-seeds 5 "
                    "--grace-period 4",
}


STUDIES: dict[str, Study] = {
    # The README's first command (after the quick sweep; README gives its measured time and scores): the quick
    # sweep's small dataset, teacher, best student (RACTD) and alpha = beta = 1, sigma = 0 trial (CTD);
    # it trains CTD itself (150 student steps) only when the sweep has no such trial. maze2d plans once per
    # episode, so 100 seeds are cheap. DDPM/DDIM (Table 11) are left out: their model costs a teacher again.
    "quick": Study(name="quick", budget="quick", data_scale="small", train_missing=True,
                   plans=(TaskPlan("maze2d-umaze", CORE + BASELINES),)),
    # A few-minute demonstration of every figure and table layout: tiny generated datasets, tiny U-Nets trained
    # for at most 200 steps, 20 seeds: what docs/figures shows. Its numbers say nothing about the method (the
    # scale label "demo-tiny" says so in every cell and figure).
    "demo": Study(name="demo-tiny", budget="quick", data_scale="tiny", train_missing=True, seeds=20,
                  sigmas=(0.3, 1.5), fig3_states=256, preset="tiny", max_train_steps=200,
                  plans=(TaskPlan("maze2d-umaze", CORE + BASELINES),
                         TaskPlan("hopper-medium-replay", CORE + ("ractd-nfe2", SIGMA_SWEEP) + BASELINES))),
    # CPU scale: every table and figure on one maze and one locomotion task (hours on a laptop; the locomotion
    # teacher's Heun-80 rollouts dominate: 158 network calls per env step).
    "default": Study(name="cpu", budget="cpu", data_scale="small",
                     plans=(TaskPlan("maze2d-umaze", _MAZE_FULL), TaskPlan("hopper-medium-replay", _LOCO_FULL))),
    # The claims study (docs/results.md, eval/results_doc.py): the paper's claims at a CPU budget on three
    # generated small datasets of different quality -- mixed (hopper-medium-replay), medium (walker2d-medium) and
    # maze2d-umaze. Every student, the teacher and the reward model come from one `tune/search.py --sigmas` run
    # per task (CLAIMS_SWEEPS), so CTD, RACTD and each sigma share teacher, budget and model selection; 100 seeds
    # for every one-step cell, 10 for the Heun-80 teacher (158 network calls per env step, closed loop). The
    # DDPM/DDIM baselines and the reward-aware teacher (Tables 3, 4, 10, 11) cost another diffusion model per
    # task and are not in it; their cells are listed as missing with the commands that train them.
    "claims": Study(name="cpu-claims", budget="cpu", data_scale="small", costly_seeds=10, sigmas=(0.3, 1.5),
                    sweep_flags=tuple(CLAIMS_SWEEPS.items()),
                    plans=(TaskPlan("maze2d-umaze", CORE + ("ractd-invdyn", "ractd-invdyn-plan") + BASELINES),
                           TaskPlan("hopper-medium-replay", CORE + MULTISTEP + (SIGMA_SWEEP,) + BASELINES,
                                    sigmas=(0.3, 1.0, 1.5)),
                           TaskPlan("walker2d-medium", CORE + (SIGMA_SWEEP,) + BASELINES, sigmas=(0.4,)))),
    # The paper: Tables 1, 2, 11 on every task, Tables 3, 5 and Fig. 4 on hopper-medium-replay, Table 10 on
    # walker2d-medium (GPU cluster).
    "paper": Study(name="paper", budget="paper", data_scale="full", plans=tuple(
        [TaskPlan(f"{env}-{split}", _LOCO_FULL if f"{env}-{split}" == "hopper-medium-replay" else
                  CORE + REWARD_AWARE_TEACHER + BASELINES if f"{env}-{split}" == "walker2d-medium" else
                  CORE + BASELINES)
         for env in ("halfcheetah", "hopper", "walker2d") for split in ("medium-expert", "medium", "medium-replay")]
        + [TaskPlan(f"maze2d-{size}", _MAZE_FULL) for size in ("umaze", "medium", "large")])),
}


def get_study(name: str, tasks: Iterable[str] | None = None, seeds: int | None = None,
              train_missing: bool | None = None) -> Study:
    """A study from STUDIES, optionally restricted to some tasks, with another seed count or training choice."""
    if name not in STUDIES:
        raise RactdError(f"unknown study {name!r}; expected one of {', '.join(STUDIES)}")
    study = STUDIES[name]
    if tasks:
        study = study.only(tasks)
    if seeds is not None:
        if seeds < 1:
            raise RactdError(f"seeds={seeds}: must be a positive integer")
        study = dataclasses.replace(study, seeds=int(seeds))
    if train_missing is not None:
        study = dataclasses.replace(study, train_missing=bool(train_missing))
    return study


# ---------------------------------------------------------------------------------------------- models

@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One checkpoint a study needs: where it is (or will be) and how to train it.

    cfg: the TrainConfig that trains it (None for a checkpoint taken from the sweep). source: "study" or "sweep".
    deps: names of the models that must exist before it can be trained (teacher, reward).
    copies: (source, destination) files put in place before training: the reward-aware teacher reads its
        reward model from <run_dir>/reward/best.pt (`train-teacher` takes no --reward-ckpt), so the study's
        reward checkpoint is copied there.
    final_of: for a final checkpoint (ctd-final, ractd-final), the model whose training writes it (not trained
        on its own).
    """

    task: str
    name: str
    stage: str
    checkpoint: Path
    cfg: object | None
    source: str = "study"
    deps: tuple[str, ...] = ()
    copies: tuple[tuple[Path, Path], ...] = ()
    final_of: str = ""

    @property
    def exists(self) -> bool:
        return self.checkpoint.is_file()

    @property
    def sigma(self) -> float:
        if self.cfg is not None and self.stage == "student":
            return float(self.cfg.resolved().distill.sigma)
        return float("nan")

    def command(self, budget: str) -> str:
        """The `python -m ractd ...` command that trains this checkpoint (same config as `cfg`)."""
        if self.cfg is None:
            return f"# {self.checkpoint} comes from the sweep: python tune/search.py --task {self.task}"
        pre = [f"mkdir -p {shlex.quote(str(dst.parent))} && cp {shlex.quote(str(src))} {shlex.quote(str(dst))}"
               for src, dst in self.copies]
        return " && ".join(pre + [train_command(self.cfg, budget)])

    def put_copies(self) -> None:
        from ractd.checkpoint import copy_checkpoint

        for src, dst in self.copies:
            if not dst.is_file():
                copy_checkpoint(src, dst)


def task_sigmas(study: Study, task: str) -> tuple[float, ...]:
    """The reward weights of a task's sigma sweep: its plan's, else the study's."""
    plan = next((p for p in study.plans if p.task == task), None)
    return plan.sigmas if plan is not None and plan.sigmas else study.sigmas


def study_root(study: Study, task: str) -> Path:
    from ractd.paths import runs_dir

    return runs_dir() / "study" / f"{task}-{study.name}"


_STAGE_COMMAND = {"reward": "train-reward", "teacher": "train-teacher", "ddpm": "train-ddpm", "student": "distill",
                  "bc": "train-bc"}


def train_command(cfg, budget: str) -> str:
    """The command line whose config equals `cfg`: the stage's command, the budget flag, then one flag per field
    that differs from the budget's default (flags as ractd.cli generates them from the dataclasses)."""
    from ractd.config import _flag
    from ractd.train import TrainConfig

    base = TrainConfig.for_stage(cfg.stage, budget, task=cfg.task)
    argv = ["python", "-m", "ractd", _STAGE_COMMAND[cfg.stage], "--task", cfg.task]
    argv += {"quick": ["--quick"], "paper": ["--paper"]}.get(budget, [])
    top = {f.name for f in dataclasses.fields(TrainConfig)}

    def emit(name: str, value, default, nested: bool):
        if value == default:
            return
        flag = _flag(f"distill_{name}" if nested and name in top else name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv.extend([flag, *map(str, value)])
        else:
            argv.extend([flag, str(value)])

    for f in dataclasses.fields(TrainConfig):
        if f.name in ("task", "stage"):
            continue
        value, default = getattr(cfg, f.name), getattr(base, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                emit(sub.name, getattr(value, sub.name), getattr(default, sub.name), nested=True)
        else:
            emit(f.name, value, default, nested=False)
    return shlex.join(argv)


def inverse_dynamics_path(study: Study, task: str) -> Path:
    """The inverse dynamics model the study's maze2d planner uses (the one `evaluate --tracker
    inverse_dynamics` loads for a checkpoint of this data scale)."""
    from ractd.inverse_dynamics import default_path

    return default_path(task, study.data_scale)


def ensure_inverse_dynamics(study: Study) -> list[Path]:
    """Train the inverse dynamics model of every task with an inverse-dynamics method when it is missing (about a
    minute on a CPU for the default config); returns the files written."""
    from ractd.data.d4rl import load_dataset
    from ractd.inverse_dynamics import train_inverse_dynamics

    written = []
    for task in study.tasks:
        path = inverse_dynamics_path(study, task)
        if path.is_file() or not any(get_method(m).tracker != "pd" for m in expand_methods(study, task)):
            continue
        log.info("training the inverse dynamics model of %s -> %s", task, path)
        train_inverse_dynamics(load_dataset(get_task(task), scale=study.data_scale), out=path, progress=True)
        written.append(path)
    return written


def _sweep(study: Study, task: str) -> dict | None:
    """The sweep's best_config.json for (task, data scale), with absolute checkpoint paths, or None."""
    from ractd.paths import sweep_dir

    d = sweep_dir(task, study.data_scale)
    path = d / "best_config.json"
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RactdError(f"cannot read {path}: {e}") from None
    ckpt = Path(best.get("checkpoint") or d / "best" / "checkpoint.pt")
    if not ckpt.is_absolute():
        ckpt = d / ckpt
    best["checkpoint"] = str(ckpt if ckpt.is_file() else d / "best" / "checkpoint.pt")
    return best


def _sweep_trials(study: Study, task: str, wanted: Iterable[tuple[float, float, float]] | None = None
                  ) -> dict[tuple[float, float, float], Path]:
    """{(alpha, beta, sigma): student/best.pt} of the sweep's completed trials (the first at each weights). CTD
    is the point alpha = beta = 1, sigma = 0 (for maze2d the Table 9 point, every sweep's first trial); a sweep
    run with `--sigmas` also holds the sigma study's students (Table 9 alpha, beta). Such a student has the
    sweep's teacher, reward model, budget and model selection, so it compares like for like with the sweep's
    RACTD, and it is not trained twice. A checkpoint in run storage (a sweep on a cluster: s3://...) is fetched
    into the sweep's trials/<trial_id>/student/best.pt on this machine, for the weights in `wanted` (default:
    all)."""
    from ractd import storage
    import pyarrow.parquet as pq

    from ractd.paths import sweep_dir

    path = sweep_dir(task, study.data_scale) / "trials.parquet"
    if not path.is_file():
        return {}
    wanted = None if wanted is None else {tuple(float(x) for x in w) for w in wanted}
    out: dict[tuple[float, float, float], Path] = {}
    for r in pq.read_table(path).to_pylist():
        weights = (r.get("alpha"), r.get("beta"), r.get("sigma"))
        if r.get("status") != "completed" or not r.get("checkpoint") or weights in out:
            continue
        if wanted is not None and weights not in wanted:
            continue
        ckpt = r["checkpoint"]
        if storage.is_uri(ckpt) or "/ractd/student/" in ckpt:  # stored by the sweep (ractd_ray.train's layout)
            # the trial's run folder on this machine: its worker's (one machine), else fetched from storage
            local = path.parent / "trials" / r["trial_id"] / "student" / "best.pt"
            if not local.is_file() and storage.exists(ckpt):
                storage.download(ckpt, local)
                fetch_final_checkpoint(ckpt, local.parent / "latest" / "checkpoint.pt")
            ckpt = str(local)
        if Path(ckpt).is_file():
            out[weights] = Path(ckpt)
    return out


def fetch_final_checkpoint(best_loc: str, local) -> None:
    """The final checkpoint beside a stored best.pt (<run>/ractd/student/best.pt): the run's latest persisted Ray
    checkpoint (<run>/student-<step>/checkpoint.pt), copied to `local` (ctd-final, ractd-final read it there)."""
    from ractd import storage

    run = best_loc.rsplit("/ractd/", 1)[0]
    steps = [n for n in storage.list_dir(run) if n.startswith("student-")]
    if steps and storage.exists(storage.join(run, max(steps), "checkpoint.pt")):
        storage.download(storage.join(run, max(steps), "checkpoint.pt"), local)


def ractd_weights(study: Study, task: str) -> tuple[float, float, float, str]:
    """(alpha, beta, sigma, where from) of the task's RACTD student: the sweep's best, else Table 9."""
    best = _sweep(study, task)
    if best is not None and all(k in best for k in ("alpha", "beta", "sigma")):
        return float(best["alpha"]), float(best["beta"]), float(best["sigma"]), "sweep"
    w = get_task(task).weights
    return w.alpha, w.beta, w.sigma, "Table 9"


def plan_models(study: Study, task: str) -> dict[str, ModelPlan]:
    """Every model the task's methods need (and their dependencies), keyed by model name."""
    from ractd.checkpoint import load_checkpoint
    from ractd.train import TrainConfig

    t = get_task(task)
    root = study_root(study, task)
    alpha, beta, sigma, _ = ractd_weights(study, task)
    methods = expand_methods(study, task)
    models: dict[str, ModelPlan] = {}

    def cfg_for(name: str, stage: str, **kw) -> TrainConfig:
        if study.preset:
            kw["preset"] = study.preset
        if study.max_train_steps:
            kw["steps"] = min(study.max_train_steps, TrainConfig.for_stage(stage, study.budget).steps)
        return TrainConfig.for_stage(stage, study.budget, task=task, run_dir=str(root / name),
                                     scale=study.data_scale, **kw)

    def add(name: str, stage: str, deps: tuple[str, ...] = (), copies=(), **kw) -> None:
        cfg = cfg_for(name, stage, **kw)
        models[name] = ModelPlan(task, name, stage, Path(cfg.run_dir) / stage / "best.pt", cfg, deps=deps,
                                 copies=tuple(copies))

    # upstream models: the sweep's when it has run, else trained here
    best = _sweep(study, task)
    if best is not None and Path(best["checkpoint"]).is_file():
        ck_cfg = load_checkpoint(Path(best["checkpoint"]))["config"]
        models["ractd"] = ModelPlan(task, "ractd", "student", Path(best["checkpoint"]), None, source="sweep")
        for up in ("teacher", "reward"):  # best_config.json names them; else the student's own config does
            p = best.get(up) or ck_cfg.get(f"{up}_ckpt") or ""
            if p and Path(p).is_file():
                models[up] = ModelPlan(task, up, up, Path(p), None, source="sweep")
        if "teacher" in models:
            points = [("ctd", (1.0, 1.0, 0.0))] + [(f"sigma-{x:g}", (alpha, beta, float(x)))
                                                   for x in task_sigmas(study, task)]
            trials = _sweep_trials(study, task, wanted=[w for _, w in points])
            for name, (a, b, s) in points:
                found = trials.get((float(a), float(b), float(s)))
                if found is not None:
                    models[name] = ModelPlan(task, name, "student", found, None, source="sweep")
    if "reward" not in models and t.kind == "locomotion":
        add("reward", "reward")
    if "teacher" not in models:
        add("teacher", "teacher")
    reward_ckpt = str(models["reward"].checkpoint) if "reward" in models else ""

    def student(name: str, a: float, b: float, s: float, teacher: str) -> None:
        deps = (teacher,) + (("reward",) if s > 0 else ())
        distill = dataclasses.replace(TrainConfig.for_stage("student", study.budget).distill, alpha=a, beta=b, sigma=s)
        add(name, "student", deps, distill=distill,
            teacher_ckpt=str(models[teacher].checkpoint), reward_ckpt=reward_ckpt if s > 0 else "")

    needed = {get_method(m).model for m in methods}
    if needed & {"ddpm"}:
        add("ddpm", "ddpm")
    if "bc" in needed:
        add("bc", "bc")
    if "ctd" in needed and "ctd" not in models:
        student("ctd", 1.0, 1.0, 0.0, "teacher")
    if "ractd" in needed and "ractd" not in models:
        student("ractd", alpha, beta, sigma, "teacher")
    for s in task_sigmas(study, task):
        if f"sigma-{s:g}" in needed and f"sigma-{s:g}" not in models:
            student(f"sigma-{s:g}", alpha, beta, float(s), "teacher")
    if needed & {"ra-teacher-ctd", "ra-teacher-ractd"}:
        w = study.ra_teacher_weight if study.ra_teacher_weight >= 0 else (sigma if sigma > 0 else 1.0)
        add("ra-teacher", "teacher", ("reward",), reward_aware_teacher=float(w),
            copies=[(Path(reward_ckpt), root / "ra-teacher" / "reward" / "best.pt")])
        if "ra-teacher-ctd" in needed:
            student("ra-teacher-ctd", 1.0, 1.0, 0.0, "ra-teacher")
        if "ra-teacher-ractd" in needed:
            student("ra-teacher-ractd", alpha, beta, sigma, "ra-teacher")
    models = _share_identical(models)
    for base in ("ctd", "ractd"):  # the final checkpoint beside the selected best.pt (ractd.train's run layout)
        if f"{base}-final" in needed and base in models:
            b = models[base]
            run = b.checkpoint.parent
            if base == "ractd" and b.source == "sweep" and best and best.get("trial_checkpoint"):
                run = Path(best["trial_checkpoint"]).parent  # best/checkpoint.pt is a copy; its run is the trial's
            models[f"{base}-final"] = ModelPlan(task, f"{base}-final", "student", run / "latest" / "checkpoint.pt", None,
                                                source=b.source, deps=(base,), final_of=base)
    return models


def _share_identical(models: dict[str, ModelPlan]) -> dict[str, ModelPlan]:
    """A model whose training config equals an earlier one's (up to run_dir) uses that model's checkpoint."""
    seen: dict[str, ModelPlan] = {}
    out: dict[str, ModelPlan] = {}
    for name, m in models.items():
        if m.cfg is None:
            out[name] = m
            continue
        key = json.dumps(dataclasses.asdict(dataclasses.replace(m.cfg, run_dir="")), sort_keys=True, default=str)
        if key in seen:
            first = seen[key]
            out[name] = dataclasses.replace(first, name=name)
            log.info("%s: %s has the same training config as %s; they share %s", m.task, name, first.name,
                     first.checkpoint)
        else:
            seen[key] = m
            out[name] = m
    return out


def expand_methods(study: Study, task: str) -> list[str]:
    """The plan's method ids for a task, "sigma-sweep" expanded; reward-model methods dropped on maze2d."""
    plan = next((p for p in study.plans if p.task == task), None)
    if plan is None:
        raise RactdError(f"task {task} is not in study {study.name}")
    kind = get_task(task).kind
    out: list[str] = []
    for m in plan.methods:
        if (m in NEEDS_REWARD and kind == "maze") or (m in MAZE_ONLY and kind != "maze"):
            continue
        if m == SIGMA_SWEEP:
            out += [sigma_method(s).id for s in task_sigmas(study, task)]
        else:
            out.append(get_method(m).id)
    return out


# ---------------------------------------------------------------------------------------------- training

Trainer = Callable[[object], None]


def train_locally(cfg) -> None:
    """Train one stage in this process with ractd.train.train (progress bar on)."""
    from ractd.train import RunContext, train

    train(cfg, RunContext(progress=True))


_STAGE_ORDER = {"reward": 0, "bc": 0, "teacher": 1, "ddpm": 1, "student": 2}


def ensure_models(study: Study, trainer: Trainer = train_locally) -> list[ModelPlan]:
    """Train every missing checkpoint of the study in dependency order (reward, teachers, students); returns
    the models trained. A model is trained once even when several names share it."""
    trained: list[ModelPlan] = []
    for task in study.tasks:
        models = plan_models(study, task)
        unique: dict[Path, ModelPlan] = {}
        for m in models.values():
            unique.setdefault(m.checkpoint, m)  # a shared checkpoint is trained once, under its first name
        order = sorted(unique.values(),
                       key=lambda m: (_STAGE_ORDER[m.stage], m.name != "teacher", m.name))
        for m in order:
            if m.exists or m.final_of:  # a final checkpoint comes with its student's training
                continue
            if m.cfg is None:
                raise RactdError(f"{m.checkpoint} (from the sweep) is missing; rerun tune/search.py --task {task}")
            for dep in m.deps:
                if not models[dep].exists:
                    raise RactdError(f"{task}/{m.name} needs {models[dep].checkpoint}, which training did not write")
            log.info("training %s/%s (%s, %d steps)", task, m.name, m.stage, m.cfg.steps)
            m.put_copies()
            trainer(m.cfg)
            if not m.exists:
                raise RactdError(f"training {task}/{m.name} finished without writing {m.checkpoint}")
            trained.append(m)
    ensure_inverse_dynamics(study)
    return trained


# ---------------------------------------------------------------------------------------------- cells

@dataclasses.dataclass(frozen=True)
class EvalJob:
    """One evaluated cell: a method of a task with one checkpoint. `key_method` is the method stored in the
    results (with "@<steps>" when episodes are capped below the task's length, so capped episodes never count
    as the paper's protocol)."""

    task: str
    method: str
    sampler: str
    nfe: int
    checkpoint_path: str
    checkpoint: str          # short sha256 of the file
    scale: str
    sigma: float = float("nan")
    preset: str = ""
    train_steps: int = -1
    init_scaled: bool = True
    max_steps: int = 0       # 0 = the task's episode length
    tracker: str = "pd"      # maze2d: pd | inverse_dynamics
    seed_cap: int = 0        # evaluate only the first seed_cap of the study's seeds (0 = all)
    precision: str = "fp32"  # the store's episodes are fp32: the same numbers whatever the block size or node
    # (bf16 engines change a batched call's rows by ~1e-2 with the batch's composition; bench/bf16_scores.py)

    def seeds(self, seeds: list[int]) -> list[int]:
        return list(seeds[:self.seed_cap]) if self.seed_cap else list(seeds)

    @property
    def key_method(self) -> str:
        full = get_task(self.task).max_episode_steps
        return self.method if self.max_steps in (0, full) else f"{self.method}@{self.max_steps}"

    def keys(self, seeds: Iterable[int]) -> list[tuple]:
        return [(self.task, self.key_method, self.checkpoint, int(s)) for s in seeds]


@dataclasses.dataclass(frozen=True)
class Missing:
    task: str
    method: str
    checkpoint: Path
    command: str


def make_job(task: str, method: str, checkpoint, scale: str, max_steps: int = 0, sigma: float | None = None,
             hash_cache: dict | None = None, seed_cap: int = 0) -> EvalJob:
    """The EvalJob of a method (METHODS id) on a checkpoint file (its hash, preset and steps read here)."""
    from ractd.checkpoint import load_checkpoint

    m = get_method(method)
    path = Path(checkpoint)
    cache = hash_cache if hash_cache is not None else {}
    if path not in cache:
        cfg = load_checkpoint(path)["config"]
        cache[path] = (checkpoint_hash(path), cfg)
    digest, cfg = cache[path]
    if sigma is None:
        sigma = float(cfg["distill"]["sigma"]) if cfg.get("stage") == "student" else float("nan")
    return EvalJob(task=task, method=m.id, sampler=m.sampler, nfe=m.nfe, checkpoint_path=str(path),
                   checkpoint=digest, scale=scale, sigma=sigma, preset=str(cfg.get("preset", "")),
                   train_steps=int(cfg.get("steps", -1)), max_steps=int(max_steps), tracker=m.tracker,
                   seed_cap=int(seed_cap))


def study_jobs(study: Study, max_steps: int = 0) -> tuple[list[EvalJob], list[Missing]]:
    """(jobs for every cell whose checkpoint exists, missing cells with the command that trains them)."""
    jobs: list[EvalJob] = []
    missing: list[Missing] = []
    hashes: dict = {}
    for task in study.tasks:
        models = plan_models(study, task)
        for mid in expand_methods(study, task):
            method = get_method(mid)
            model = models[method.model]
            costly = get_task(task).kind == "locomotion" and method.nfe > 4 and method.sampler != "student"
            if model.exists and method.tracker != "pd" and not inverse_dynamics_path(study, task).is_file():
                missing.append(Missing(task, mid, inverse_dynamics_path(study, task),
                                       f"python -m ractd.inverse_dynamics {task} --scale {study.data_scale}"))
            elif model.exists:
                job = make_job(task, mid, model.checkpoint, study.name, max_steps, hash_cache=hashes,
                               seed_cap=study.costly_seeds if costly else 0)
                if mid.startswith("ractd-sigma-") and any(j.task == task and j.method == "ractd" and
                                                          j.checkpoint == job.checkpoint for j in jobs):
                    log.info("%s: %s is the RACTD checkpoint; its cell is RACTD's", task, mid)
                    continue  # the same file: Fig. 4 and the tables read it from the RACTD cell
                jobs.append(job)
            elif model.final_of and models[model.final_of].exists:
                missing.append(Missing(task, mid, model.checkpoint,
                                       f"# {models[model.final_of].checkpoint} was kept without its final checkpoint; "
                                       "retrain it to evaluate the final one"))
            elif task in dict(study.sweep_flags) and model.stage != "bc":
                missing.append(Missing(task, mid, model.checkpoint,
                                       f"python tune/search.py --task {task} {dict(study.sweep_flags)[task]}"))
            elif model.final_of:
                base = models[model.final_of]
                chain = [models[d] for d in base.deps if not models[d].exists] + [base]
                missing.append(Missing(task, mid, model.checkpoint,
                                       " && ".join(dict.fromkeys(m.command(study.budget) for m in chain))))
            else:
                chain = [models[d] for d in model.deps if not models[d].exists] + [model]
                missing.append(Missing(task, mid, model.checkpoint,
                                       " && ".join(dict.fromkeys(m.command(study.budget) for m in chain))))
    return jobs, missing


def blocks(jobs: list[EvalJob], seeds: list[int], done: set[tuple], block_size: int) -> list[tuple[EvalJob, list[int]]]:
    """Split each job's not-yet-stored seeds into blocks of at most block_size seeds."""
    out = []
    for job in jobs:
        mine = job.seeds(seeds)
        todo = [s for s, k in zip(mine, job.keys(mine)) if k not in done]
        for i in range(0, len(todo), max(1, block_size)):
            out.append((job, todo[i:i + block_size]))
    return out


def policy_key(job: EvalJob) -> tuple:
    """What identifies a job's policy object: jobs with equal keys may share one loaded policy (evaluate_serial,
    the pool's actors); everything load_policy reads from the job besides the file is in it."""
    return (job.checkpoint, job.sampler, job.nfe, job.init_scaled, job.tracker, job.precision)


def load_policy(job: EvalJob, checkpoint_file=None, device: str = "cpu", inverse_dynamics_file=None):
    """The job's policy (LocomotionPolicy or MazePlanner), from checkpoint_file (default: job.checkpoint_path),
    its network on `device`; an inverse-dynamics tracker from inverse_dynamics_file (default: its default path,
    ractd.inverse_dynamics.default_path)."""
    import inspect

    from ractd.evaluate import policy_from_checkpoint

    kw = {}
    if device != "cpu":
        if "device" not in inspect.signature(policy_from_checkpoint).parameters:
            raise RactdError("ractd.evaluate.policy_from_checkpoint has no device argument; evaluate on CPU")
        kw["device"] = device
    if job.tracker != "pd":
        kw["tracker"] = job.tracker
        if inverse_dynamics_file:
            kw["inverse_dynamics"] = str(inverse_dynamics_file)
    policy, task, _ = policy_from_checkpoint(checkpoint_file or job.checkpoint_path, job.sampler, job.nfe,
                                             job.init_scaled, precision=job.precision, **kw)
    if task.name != job.task:
        raise RactdError(f"{job.checkpoint_path} was trained on {task.name}, not {job.task}")
    return policy


def run_block(job: EvalJob, seeds: list[int], policy=None, device: str = "cpu", versions: dict | None = None,
              progress: bool = False) -> list[dict]:
    """Roll out one block of seeds of a job (ractd.rollout, batched) -> episode rows for the store."""
    from ractd.rollout import rollout_locomotion, rollout_maze

    policy = policy if policy is not None else load_policy(job)
    task = get_task(job.task)
    roll = rollout_locomotion if task.kind == "locomotion" else rollout_maze
    t0 = time.perf_counter()
    records = roll(task, policy, list(seeds), max_steps=job.max_steps or None, progress=progress)
    wall = time.perf_counter() - t0
    return episode_rows(records, method=job.key_method, sampler=job.sampler, nfe=job.nfe,
                        checkpoint=job.checkpoint, checkpoint_path=job.checkpoint_path, scale=job.scale,
                        wall_s=wall, max_steps=job.max_steps or task.max_episode_steps, init_scaled=job.init_scaled,
                        sigma=job.sigma, preset=job.preset, train_steps=job.train_steps, device=device,
                        versions=versions or library_versions())


def evaluate_serial(jobs: list[EvalJob], seeds: list[int], store: ResultsStore, block_size: int = 100,
                    progress: bool = True) -> dict:
    """Run every missing (job, seed) in this process, one block per call, each block stored as it completes.
    Returns {"episodes_run", "blocks"}. The Ray counterpart is ractd_ray.pool.evaluate."""
    todo = blocks(jobs, seeds, store.done_keys(), block_size)
    policies: dict = {}
    n = 0
    for job, block in todo:
        key = policy_key(job)
        if key not in policies:
            policies[key] = load_policy(job)
        store.write_episodes(run_block(job, block, policies[key], progress=progress))
        n += len(block)
    return {"episodes_run": n, "blocks": len(todo)}


# ---------------------------------------------------------------------------------------------- baseline rows

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
        rows = [r for r in rows if (r["task"], r["method"], r["checkpoint"]) not in done]
        store.write_episodes(rows)
        written += len(rows)
    return written


# ---------------------------------------------------------------------------------------------- Fig. 3

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


def sweep_usage_lines(study: Study) -> list[str]:
    """One line per task: which models come from the task's sweep at the study's data scale (its best student as
    RACTD, its alpha = beta = 1, sigma = 0 trial as CTD, its teacher and reward model) and which are trained here."""
    from ractd.paths import sweep_dir

    lines = []
    for task in study.tasks:
        best = _sweep(study, task)
        d = sweep_dir(task, study.data_scale)
        if best is None:
            lines.append(f"{task}: no sweep at scale {study.data_scale} ({d}): RACTD at the Table 9 weights, every "
                         f"model from this study")
            continue
        models = plan_models(study, task)
        used = sorted(n for n, m in models.items() if m.source == "sweep")
        own = sorted(n for n, m in models.items() if m.source != "sweep")
        lines.append(f"{task}: from the sweep {d} (best trial {best.get('trial_id', '?')}: alpha={best['alpha']:.4g} "
                     f"beta={best['beta']:.4g} sigma={best['sigma']:.4g}): {', '.join(used) or 'nothing'}"
                     + (f"; from this study: {', '.join(own)}" if own else ""))
    return lines


def summary_lines(jobs: list[EvalJob], missing: list[Missing]) -> list[str]:
    """Human-readable plan: what will be evaluated, what is missing and how to train it."""
    lines = [f"evaluate {j.task} {j.method} ({j.sampler}, NFE {j.nfe}) on {Path(j.checkpoint_path)} [{j.checkpoint}]"
             for j in jobs]
    for m in missing:
        lines.append(f"missing {m.task} {m.method}: {m.checkpoint} not found; train it with: {m.command}")
    return lines
