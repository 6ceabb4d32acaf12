"""bench/gpu.py without a GPU: one line and exit code 2 where CUDA is missing; its CPU smoke run (--device cpu
--tiny) goes through the whole path (stand-in teacher and reward model, in-process probe, one Ray Train worker,
latency table) and writes its JSON to $OUT, so the script is known to run before it meets a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_without_cuda_it_fails_with_one_line():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no CUDA device") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""


@pytest.mark.ray
def test_cpu_smoke_run_writes_every_figure(tmp_path, monkeypatch, capsys, load_script):
    pytest.importorskip("ray")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    bench = load_script("bench/gpu.py")
    assert bench.main(["--device", "cpu", "--tiny", "--steps", "8", "--batch", "16", "--probe-steps", "2",
                       "--reps", "3"]) == 0
    r = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert r["preset"] == "tiny" and r["device"] == "cpu" and r["batch"] == 16
    w = r["ray_worker"]
    assert w["steps"] == 8 and w["steps_per_s"] > 0 and r["in_process_steps_per_s"] > 0
    assert 0 < w["train_time_s"] < w["fit_time_s"] and w["peak_gpu_bytes"] is None  # no GPU: no memory figure
    assert r["latency"]["params"] > 0
    for b in (1, 100):
        row = r["latency"][f"batch{b}"]
        assert set(row) == {"policy", "jump", "jump_bf16"}  # CUDA graphs only on CUDA
        for v in row.values():
            assert v["wall_ms"] > 0 and v["per_action_ms"] == pytest.approx(v["wall_ms"] / b)
    out = capsys.readouterr().out
    assert "fastest per-action latency at batch 1" in out and "wrote" in out
