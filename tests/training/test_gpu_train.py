"""bench/gpu_train.sh --dry-run: the GPU training script end to end on the CPU (tiny model, made-up images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REFERENCE_DIR, REPO_ROOT
from tests.requires import unavailable


@pytest.mark.slow
def test_gpu_train_dry_run_checks_parity_times_trains_and_writes_weights(tmp_path):
    if not (REFERENCE_DIR / "dcl_step.pt").is_file():
        unavailable(f"{REFERENCE_DIR / 'dcl_step.pt'} not found: the parity step would not run")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_TRAIN_BUDGET_S": "45"}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu_train.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_train_results.json").read_text())
    assert results["parity"] == {"ok": True}
    assert [s["batch"] for s in results["speed"]] == [1, 2] and all(s["iter_per_s"] > 0 for s in results["speed"])
    assert results["iterations"] >= 1
    weights = torch.load(tmp_path / "latest_net_G_A.pth", weights_only=True)
    assert "model.1.weight" in weights and (tmp_path / "latest_net_G_B.pth").is_file()
    assert (tmp_path / "metrics.jsonl").read_text().strip()


def test_gpu_train_refuses_to_run_without_a_pack(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_TRAIN_PACK": str(tmp_path / "none")}
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_train.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--pack" in proc.stderr
