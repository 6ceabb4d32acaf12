"""The evaluation studies: which tasks x methods each evaluates, at which budget, data scale and seeds.

Studies (STUDIES): "quick" (the README's first command: maze2d-umaze, quick budget, reusing the quick sweep),
"demo" (minutes: tiny datasets, every figure; docs/figures),
"default" (CPU scale: maze2d-umaze and hopper-medium-replay, small datasets, CPU budget; every table and
figure), "paper" (every task of Tables 1, 2, 11 and the ablation tasks of Tables 3-5, 10 at the paper budget).
The study name is the scale label stored with each episode and printed in every table cell.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from ractd import RactdError
from ractd.tasks import get_task
from ractd_repro.methods import (
    BASELINES,
    CORE,
    LOCO_SAMPLERS,
    LOCO_ONLY,
    MAZE_ONLY,
    MAZE_SAMPLERS,
    MULTISTEP,
    NEEDS_REWARD,
    REWARD_AWARE_TEACHER,
    SIGMA_SWEEP,
    get_method,
    sigma_method,
)
from ractd_repro.paper import PAPER_FIG4_SIGMAS


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
# reward model, a 2000-step teacher at batch 256, 400-step students at batch 128, no
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

LOCOMOTION_TASKS = tuple(f"{env}-{split}" for env in ("halfcheetah", "hopper", "walker2d")
                         for split in ("medium-expert", "medium", "medium-replay"))
MAZE_TASKS = tuple(f"maze2d-{size}" for size in ("umaze", "medium", "large"))


# Teachers the default budget left short on the twelve-task study, measured: the task's tune/search.py teacher flags
# (default: locomotion 2000 steps, maze2d the CPU budget's 3000 x 256).
# - maze2d-large: the CPU budget's teacher planned through walls and ended far from the goal (docs/results-tables.md,
#   "maze2d plans"; zero return on every seed); this one sees the same number of windows in four times as many steps
#   of a quarter of the batch (Diffuser trains its maze planners at batch 32).
# - halfcheetah-medium: its 2000-step teacher stayed below the data; the learning curves' 6000-step run ends with a
#   held-out loss 6.5% below the 2000-step run's, and its Heun-80 is within 2 SE of the data's level (the note of
#   2026-12-07).
_TABLES_TEACHERS = {"maze2d-large": "--teacher-steps 12000 --teacher-batch 64",
                    "halfcheetah-medium": "--teacher-steps 6000"}


def _tables_sweep(task: str) -> str:
    """The `tune/search.py` flags of one task of the twelve-task study: the CPU budget at the small data scale,
    every grid point run to its end (no ASHA stopping), and (locomotion) the sigma grid {0 (CTD), Table 9's sigma}
    so that CTD and the paper's point share one teacher, reward model and model selection with the sweep's pick;
    the teacher's flags from _TABLES_TEACHERS where the default fell short."""
    if task.startswith("maze2d"):  # the locomotion pieces' student budget (the CPU budget's 2000 x 256 students
        # cost 80 min a trial on 2 CPUs)
        teacher = f" {_TABLES_TEACHERS[task]}" if task in _TABLES_TEACHERS else ""
        return ("--scale small --steps 400 --batch 128 --ckpt-every 100 --num-samples 2 --select-seeds 5 "
                "--grace-period 4" + teacher)
    sigma = get_task(task).weights.sigma
    grid = "0" if sigma == 0 else f"0 {sigma:g}"
    teacher = _TABLES_TEACHERS.get(task, "--teacher-steps 2000")
    return (f"--scale small {teacher} --steps 400 --batch 128 --ckpt-every 100 --grace-period 4 "
            f"--sigmas {grid} --num-samples 3")


# The twelve-task study's sweeps (Tables 1 and 2), one per task; run a task at a time (its pieces resume).
TABLES_SWEEPS: dict[str, str] = {t: _tables_sweep(t) for t in LOCOMOTION_TASKS + MAZE_TASKS}


STUDIES: dict[str, Study] = {
    # The README's first command (after the quick sweep; docs/results.md and the command's own output give its scores):
    # the quick sweep's small dataset, teacher, best student (RACTD) and alpha = beta = 1, sigma = 0 trial (CTD);
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
    # Tables 1 and 2 in full at CPU scale (the twelve tasks, run a task at a time: `tune/search.py --task T
    # <TABLES_SWEEPS[T]>`, then `eval/reproduce_tables.py --study tables --tasks T --train-missing`; each piece adds
    # to one store, a task's cells from one dataset): RACTD (the sweep's pick), CTD, the teacher's Heun-80 (on
    # costly_seeds seeds on locomotion, where every env step replans with 158 network calls), BC, the warm-start
    # control and the data's level on every task; maze2d also DDPM-100 / DDIM-10 / DDIM-1 (Table 11).
    "tables": Study(name="cpu-tables", budget="cpu", data_scale="small", costly_seeds=10,
                    sweep_flags=tuple(TABLES_SWEEPS.items()),
                    plans=tuple(TaskPlan(t, CORE + BASELINES) for t in LOCOMOTION_TASKS)
                    + tuple(TaskPlan(t, CORE + MAZE_SAMPLERS + BASELINES) for t in MAZE_TASKS)),
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


def task_sigmas(study: Study, task: str) -> tuple[float, ...]:
    """The reward weights of a task's sigma sweep: its plan's, else the study's."""
    plan = next((p for p in study.plans if p.task == task), None)
    return plan.sigmas if plan is not None and plan.sigmas else study.sigmas


def study_root(study: Study, task: str) -> Path:
    from ractd.paths import runs_dir

    return runs_dir() / "study" / f"{task}-{study.name}"


def expand_methods(study: Study, task: str) -> list[str]:
    """The plan's method ids for a task, "sigma-sweep" expanded; reward-model methods dropped on maze2d."""
    plan = next((p for p in study.plans if p.task == task), None)
    if plan is None:
        raise RactdError(f"task {task} is not in study {study.name}")
    kind = get_task(task).kind
    out: list[str] = []
    for m in plan.methods:
        if (m in NEEDS_REWARD | LOCO_ONLY and kind == "maze") or (m in MAZE_ONLY and kind != "maze"):
            continue
        if m == SIGMA_SWEEP:
            out += [sigma_method(s).id for s in task_sigmas(study, task)]
        else:
            out.append(get_method(m).id)
    return out
