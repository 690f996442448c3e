"""``python tests/service/gated_serve.py GATE``: the real service (uvicorn, signals, drain) whose runners
compute only while the file ``GATE`` exists.

The end-to-end tests of queues, deadlines, disconnects and drains need a batch that is still running
when the next request arrives. A real model makes that a race with the machine's speed; a runner held
at a gate makes it a fact: the test removes the file, sends its requests, observes, and creates the file
to let the work go. Each runner negates its input (a wrong routing would show) and its first call, the
warm-up, never waits.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from service import serve
from service.repository import LoadedModel

PROVIDER = "GatedExecutionProvider"


class GatedRunner:
    provider = PROVIDER
    engine, precision, psnr_db, probe_ms = "gated", "float32", None, None

    def __init__(self, gate: Path, device: str) -> None:
        self.gate, self.device = gate, device
        self.warmed = False

    def run(self, batch: np.ndarray) -> np.ndarray:
        if not self.warmed:
            self.warmed = True
            return -batch
        while not self.gate.exists():
            time.sleep(0.005)
        return -batch


def main() -> int:
    gate = Path(sys.argv[1])

    def factory(model: LoadedModel, direction: str, device: str) -> GatedRunner:
        return GatedRunner(gate, device)

    return serve.main([], runner_factory=factory)


if __name__ == "__main__":
    sys.exit(main())
