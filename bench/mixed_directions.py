"""Two directions' sessions at once on the CPU: each with all cores, or the cores shared out between them.

    python bench/mixed_directions.py --seconds 6 --repeats 3

For each thread policy, interleaved ``--repeats`` times in one run: images per second of one direction
alone, then of both directions driven together (one Python thread each, as the service's workers do).
The service's default (``DCLGAN_INTRA_OP_THREADS=0``) is the shared-out policy
(:func:`service.runtime.threads_per_session`). Prints one JSON line per measurement, with the machine.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
from attack import machine  # type: ignore[import-not-found]

from service.runtime import create_session, default_threads, threads_per_session

REPO = Path(__file__).resolve().parents[1]


def rate(session: object, x: np.ndarray, seconds: float) -> float:
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        session.run(None, {"image": x})  # type: ignore[attr-defined]
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "horse2zebra")
    parser.add_argument("--directions", default="horse2zebra,zebra2horse")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    paths = [args.model / f"{d}.onnx" for d in args.directions.split(",")]
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, args.size, args.size)).astype(np.float32)
    policies = {"all cores each": default_threads(), "shared out": threads_per_session(len(paths))}
    print(json.dumps({"machine": machine()}), flush=True)
    for repeat in range(args.repeats):
        for policy, threads in policies.items():
            sessions = [create_session(p, intra_op_threads=threads) for p in paths]
            for s in sessions:
                s.run(None, {"image": x})
            alone = rate(sessions[0], x, args.seconds)
            both = [0.0] * len(sessions)

            def drive(i: int, both: list[float] = both, sessions: list[object] = sessions) -> None:
                both[i] = rate(sessions[i], x, args.seconds)

            workers = [threading.Thread(target=drive, args=(i,)) for i in range(len(sessions))]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            row = {"repeat": repeat, "policy": policy, "threads": threads, "alone_img_s": round(alone, 2)}
            print(json.dumps({**row, "together_img_s": round(sum(both), 2)}), flush=True)


if __name__ == "__main__":
    main()
