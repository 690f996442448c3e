"""Two processes with gloo on CPU (torchrun): gradients averaged, weights identical on both ranks."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_training_keeps_ranks_identical(tiny_dataroot, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "training.cli",
        "train",
        "--dataroot",
        str(tiny_dataroot),
        "--name",
        "ddp",
        "--checkpoints-dir",
        str(tmp_path),
        "--ngf",
        "4",
        "--ndf",
        "4",
        "--n-blocks",
        "1",
        "--netF-nc",
        "16",
        "--num-patches",
        "16",
        "--load-size",
        "36",
        "--crop-size",
        "32",
        "--max-iters",
        "3",
        "--threads",
        "1",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--print-freq",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) finished at iteration 3; weights sha256 ([0-9a-f]{64})", proc.stderr))
    assert set(digests) == {"0", "1"}, proc.stderr[-3000:]
    assert digests["0"] == digests["1"]
    # Rank 0 alone writes: one metrics line per iteration, not two; identical weights must also be sane ones.
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    losses = [v for r in records for k, v in r.items() if k.startswith(("d/", "g/"))]
    assert len(losses) == 3 * 9 and all(math.isfinite(v) for v in losses)
