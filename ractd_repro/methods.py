"""The evaluated methods: one column of the paper's tables each (a model, a sampler and its NFE).

Methods (METHODS; the tables in ractd_repro.tables refer to these ids):
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
"""

from __future__ import annotations

import dataclasses

from ractd import RactdError


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
    # the warm-start control: one Euler step of the teacher from sigma_max to sigma_min (2 Karras bins, 1 network
    # call) is the student at step 0 -- load_teacher_into_student makes G(x, T, s) equal to it up to float rounding
    # (tests/test_warm_start.py) -- so a distilled student must beat this cell to show what distillation adds
    Method("teacher-euler-1", "Teacher Euler, 1 network call (= the student at step 0)", "teacher", "euler", 2),
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
    # CORL's "10% BC": BC on the trajectories with the top 10% returns (ractd.bc.best_trajectories), the baseline a
    # return-aware method must beat on mixed-quality data (locomotion)
    Method("bc-10", "10% BC", "bc-10", "bc", 1),
]}


SIGMA_SWEEP = "sigma-sweep"


# methods that need the reward model R_psi (locomotion only; maze2d uses sigma = 0 and no reward model)
NEEDS_REWARD = {"ra-teacher-ctd", "ra-teacher-ractd", SIGMA_SWEEP}


# methods that need a planner (maze2d only)
MAZE_ONLY = {m.id for m in METHODS.values() if m.tracker != "pd"}
# methods of locomotion tasks only (maze2d data are goal-reaching segments without a return ranking)
LOCO_ONLY = {"bc-10"}


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


CORE = ("teacher-heun-80", "ctd", "ractd")


# beside every task's methods: behavior cloning, the warm-start control (the teacher's one-step Euler = the student
# at step 0), and the final checkpoints of the selected students
BASELINES = ("bc", "bc-10", "teacher-euler-1", "ctd-final", "ractd-final")


LOCO_SAMPLERS = ("ddpm-15", "ddim-15")                      # Table 3


MAZE_SAMPLERS = ("ddpm-100", "ddim-10", "ddim-1")           # Table 11


MULTISTEP = ("ractd-nfe2", "ractd-nfe3", "ractd-nfe4")      # Table 5


REWARD_AWARE_TEACHER = ("ra-teacher-ctd", "ra-teacher-ractd")  # Tables 4, 10
