"""Two directions' CPU runners in one process: the cores shared out (:func:`service.runtime.threads_per_session`),
all cores each at once, all cores each taking turns through one process-wide first-come-first-served lock
around ``run``, or width-adaptive (:class:`service.runtime.WidthAdaptiveRunner`: all cores for a run that
starts alone, the shared-out session for one that starts next to another).

    python bench/mixed_directions.py --engines onnxruntime,openvino --size 256 --seconds 5 --repeats 3

For each engine and policy, interleaved ``--repeats`` times in one run (so that the machine's noise falls on
all of them alike): images per second and median latency of one direction alone, then of both directions
driven together (one Python thread each, as the service's workers do). Prints one JSON line per
measurement, after one with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from attack import machine  # type: ignore[import-not-found]

from service.repository import load_model_dir
from service.runtime import Runner, RunnerConfig, default_threads, open_runner, threads_per_session

REPO = Path(__file__).resolve().parents[1]


class Turns:
    """One lock for every runner of the process, taken in arrival order (a plain lock lets the thread that
    releases it take it again at once and starve the other direction)."""

    def __init__(self) -> None:
        self._line: deque[object] = deque()
        self._changed = threading.Condition()

    def run(self, runner: Runner, batch: np.ndarray) -> np.ndarray:
        ticket = object()
        with self._changed:
            self._line.append(ticket)
            self._changed.wait_for(lambda: self._line[0] is ticket)
        try:
            return runner.run(batch)
        finally:
            with self._changed:
                self._line.popleft()
                self._changed.notify_all()


class TakingTurns:
    """A runner that runs only in its turn."""

    def __init__(self, runner: Runner, turns: Turns) -> None:
        self.runner, self.turns = runner, turns

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.turns.run(self.runner, batch)


def drive(runner: Runner, x: np.ndarray, seconds: float) -> list[float]:
    """Run ``x`` back to back for ``seconds``: the latencies."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        runner.run(x)
        latencies.append(time.perf_counter() - start)
    return latencies


def together(runners: list[Runner], x: np.ndarray, seconds: float) -> list[list[float]]:
    """Every runner driven by its own thread at once: each one's latencies."""
    results: list[list[float]] = [[] for _ in runners]

    def one(i: int) -> None:
        results[i] = drive(runners[i], x, seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(runners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summary(latencies: list[list[float]], seconds: float) -> dict[str, float]:
    every = [s for one in latencies for s in one]
    return {"img_s": round(len(every) / seconds, 2), "p50_ms": round(statistics.median(every) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "horse2zebra")
    parser.add_argument("--engines", default="onnxruntime,openvino")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model_dir(args.model)
    directions = model.card.direction_names
    cores = default_threads()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, args.size, args.size)).astype(np.float32)
    shared = threads_per_session(len(directions))
    # policy -> (threads per runner, all cores for a run that starts alone, whether the runners take turns)
    policies = {
        "shared out": (shared, False, False),
        "all cores, at once": (cores, False, False),
        "all cores, taking turns": (cores, False, True),
        "width-adaptive": (shared, True, False),
    }
    setups: dict[tuple[str, str, int], list[Runner]] = {}
    for engine in args.engines.split(","):
        for policy, (threads, alone, turns) in policies.items():
            config = RunnerConfig(
                engine=engine,  # type: ignore[arg-type]
                precision="float32",
                intra_op_threads=threads,
                all_cores_when_alone=alone,
            )
            runners: list[Runner] = [open_runner(model, d, config) for d in directions]
            for r in runners:
                r.run(x)  # warm
            if turns:
                lock = Turns()
                runners = [TakingTurns(r, lock) for r in runners]
            setups[engine, policy, threads] = runners
    print(json.dumps({"machine": machine(), "size": args.size, "seconds": args.seconds}), flush=True)
    for repeat in range(args.repeats):
        for (engine, policy, threads), runners in setups.items():
            alone = summary([drive(runners[0], x, args.seconds)], args.seconds)
            both = summary(together(runners, x, args.seconds), args.seconds)
            row = {"repeat": repeat, "engine": engine, "policy": policy, "threads": threads}
            print(json.dumps({**row, "alone": alone, "together": both}), flush=True)


if __name__ == "__main__":
    main()
