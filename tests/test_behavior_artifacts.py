"""Behavior artifacts (ractd.data.behavior_artifacts): a dataset rebuilt from them equals the SAC-generated one.

Oracle: the SAC run itself. At the tiny scale a SAC run makes hopper's medium-replay and medium-expert files;
its policies are exported into a temporary artifact folder (never into the repository); a fresh cache then
makes the same files from the artifacts alone (training is forbidden), and every array must be bit-identical.
The replay part is the one that is rebuilt rather than copied: MuJoCo re-simulates it from each episode's reset
state and the stored actions, so a wrong reset state or a lost action must show up as a difference.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ractd import RactdError
from ractd.data import behavior_artifacts as ba
from ractd.data import generate_locomotion as gl
from ractd.data.d4rl import load_d4rl_hdf5, read_metadata
from ractd.tasks import get_task

TASKS = ("hopper-medium-replay", "hopper-medium-expert")
# metadata that says where the policies came from, and so differs by design
SOURCE_KEYS = {"metadata/behavior_cache_key", "metadata/behavior_source", "metadata/replay_rebuild_exact"}


def _generate(tmp: Path, cache: str, name: str, artifacts) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        (tmp / "cwd").mkdir(parents=True, exist_ok=True)
        mp.chdir(tmp / "cwd")
        mp.setenv("RACTD_CACHE_DIR", str(tmp / cache))
        return gl.generate_locomotion(get_task(name), scale="tiny", seed=0, out=tmp / cache / f"{name}.hdf5",
                                      artifacts=artifacts)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(tmp, SAC-made files by task, the artifact root, export's behavior.json)."""
    tmp = tmp_path_factory.mktemp("artifacts")
    sac = {name: _generate(tmp, "sac", name, None) for name in TASKS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RACTD_CACHE_DIR", str(tmp / "sac"))
        meta = ba.export_artifacts(gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=None), root=tmp / "art")
    return tmp, sac, tmp / "art", meta


@pytest.fixture
def no_training(monkeypatch):
    def fail(self, until):
        raise AssertionError("generation from artifacts must not train SAC")

    monkeypatch.setattr(gl.Trainer, "run", fail)


def _assert_same_dataset(a: Path, b: Path) -> None:
    x, y = load_d4rl_hdf5(a), load_d4rl_hdf5(b)
    assert set(x) - SOURCE_KEYS == set(y) - SOURCE_KEYS
    for k in sorted(set(x) - SOURCE_KEYS):
        if k.startswith("metadata/"):
            assert x[k] == y[k], k
        else:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_export_writes_small_checked_files(exported):
    _, _, root, meta = exported
    folder = ba.artifact_folder("Hopper-v5", "tiny", 0, root)
    assert sorted(p.name for p in folder.iterdir()) == ["behavior.json", "expert.pt", "medium.pt", "random.pt",
                                                        "replay.npz"]
    assert meta["recipe_key"] == gl.recipe_for("Hopper-v5", "tiny").key()
    assert set(meta["rebuild_check"]["max_abs_diff"].values()) == {0.0}
    assert meta["returns"]["medium"]["step"] == gl.RECIPES["tiny"].medium_max_steps
    assert meta["returns"]["medium-replay"]["n_transitions"] == gl.RECIPES["tiny"].medium_max_steps
    assert all(meta["file_bytes"][f"{w}.pt"] < 20_000 for w in ba.POLICIES)  # the actor only: 32x32 nets
    assert json.loads((folder / "behavior.json").read_text()) == meta


@pytest.mark.parametrize("name", TASKS)
def test_rebuild_from_artifacts_equals_sac_dataset(exported, name, no_training):
    tmp, sac, root, _ = exported
    path = _generate(tmp, f"from-artifacts-{name}", name, root)
    _assert_same_dataset(sac[name], path)
    meta = read_metadata(path)
    assert meta["behavior_cache_key"].endswith("-artifacts") and "artifacts hopper/tiny-seed0" in meta[
        "behavior_source"]
    if name == "hopper-medium-replay":
        assert meta["replay_rebuild_exact"] == 1


def test_a_wrong_reset_state_or_a_lost_action_changes_the_replay(exported):
    """The equality above is not vacuous: the re-simulation follows the reset states and actions."""
    tmp, _, root, _ = exported
    folder = ba.artifact_folder("Hopper-v5", "tiny", 0, root)
    inputs = ba.read_replay_inputs(folder / "replay.npz")
    original = gl.load_npz(next((tmp / "sac" / "behavior").rglob("replay.npz")))
    assert set(ba.compare_replays(ba.rebuild_replay("Hopper-v5", inputs), original).values()) == {0.0}

    wrong = dict(inputs, reset_qpos=inputs["reset_qpos"].copy())
    wrong["reset_qpos"][1, 1] += 1e-3  # the second episode starts 1 mm higher
    diff = ba.compare_replays(ba.rebuild_replay("Hopper-v5", wrong), original)
    assert diff["observations"] > 0 and diff["infos/qpos"] > 0
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(ba.rebuild_replay("Hopper-v5", wrong)["observations"], original["observations"])

    half = len(inputs["actions"]) // 2  # an untrained hopper falls within ~20 steps: many episodes per half
    with pytest.raises(RactdError, match="reset states left"):
        ba.rebuild_replay("Hopper-v5", dict(inputs, actions=inputs["actions"][:half],
                                            action_log_probs=inputs["action_log_probs"][:half]))
    with pytest.raises(RactdError, match="actions left"):
        ba.rebuild_replay("Hopper-v5", dict(inputs, reset_qpos=inputs["reset_qpos"][:-1],
                                            reset_qvel=inputs["reset_qvel"][:-1]))


def test_export_refuses_a_rebuild_that_differs(exported, tmp_path, monkeypatch):
    tmp, _, _, _ = exported
    monkeypatch.setenv("RACTD_CACHE_DIR", str(tmp / "sac"))
    rebuild = ba.rebuild_replay

    def off_by_a_bit(env_id, inputs, desc=None):
        data = rebuild(env_id, inputs)
        data["rewards"][5] += 1e-6
        return data

    monkeypatch.setattr(ba, "rebuild_replay", off_by_a_bit)
    with pytest.raises(RactdError, match="differs"):
        ba.export_artifacts(gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=None), root=tmp_path)
    assert not (ba.artifact_folder("Hopper-v5", "tiny", 0, tmp_path) / "behavior.json").exists()
    assert gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=tmp_path).artifacts is None


def test_another_recipe_or_a_damaged_file_is_not_used(exported, tmp_path, caplog):
    _, _, root, _ = exported
    copy = tmp_path / "art"
    shutil.copytree(root, copy)
    folder = ba.artifact_folder("Hopper-v5", "tiny", 0, copy)
    assert gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=copy).artifacts == folder

    (folder / "medium.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(RactdError, match="sha256"):
        ba.install_policies(folder, tmp_path / "cache")

    meta = json.loads((folder / "behavior.json").read_text())
    (folder / "behavior.json").write_text(json.dumps(dict(meta, recipe_key="00000000")))
    assert gl.BehaviorCache("Hopper-v5", "tiny", 0, artifacts=copy).artifacts is None  # -> SAC
    assert "not the current" in caplog.text


def test_replay_inputs_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    inputs = {"actions": rng.uniform(-1, 1, (50, 6)).astype(np.float32),
              "action_log_probs": rng.normal(size=50).astype(np.float32),
              "reset_qpos": rng.normal(size=(3, 9)), "reset_qvel": rng.normal(size=(3, 9))}
    ba._write_inputs(tmp_path / "r.npz", inputs)
    back = ba.read_replay_inputs(tmp_path / "r.npz")
    for k, v in inputs.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


# ---------------------------------------------------------------------------------------------- the committed ones


def _committed() -> list[Path]:
    return sorted(p.parent for p in ba.ARTIFACT_DIR.glob("*/*/behavior.json"))


def test_committed_artifacts_are_intact_and_current():
    """Every folder under ractd/data/behavior/: files match their sha256, the recipe is today's (otherwise
    generation would ignore them), the actors load, and the whole folder stays small."""
    for folder in _committed():
        meta = ba.read_behavior_json(folder)
        assert meta["recipe_key"] == gl.recipe_for(meta["env_id"], meta["scale"]).key(), folder
        assert folder == ba.artifact_folder(meta["env_id"], meta["scale"], meta["seed"])
        for name in meta["sha256"]:
            ba._checked_bytes(folder, name, meta)
        for which in ba.POLICIES:
            gl.load_actor(folder / f"{which}.pt", meta["env_id"], gl.recipe_for(meta["env_id"], meta["scale"]))
        assert sum(meta["file_bytes"].values()) < 8_000_000, folder
        assert meta["evals"]["medium"]["reached"], folder


@pytest.mark.slow
@pytest.mark.parametrize("folder", _committed(), ids=lambda p: f"{p.parent.name}-{p.name}")
def test_committed_replay_rebuilds_as_exported(folder):
    """On a machine like the exporter's, the rebuilt medium-replay is bit-identical to the SAC run's."""
    meta = ba.read_behavior_json(folder)
    data = ba.rebuild_replay(meta["env_id"], ba.read_replay_inputs(folder / "replay.npz"))
    assert ba.fingerprint(data) == meta["replay_fingerprint"]
