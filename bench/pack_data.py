"""Pack an unpaired dataset for a machine without network: trainA/trainB resized once, re-encoded as JPEG.

    python bench/pack_data.py --dataroot ../shared/data/horse2zebra --out runs/gpu_pack --size 286
    python bench/pack_data.py --fake 6 --out /tmp/pack --size 36      # made-up images, for tests

Images are resized to a ``size`` x ``size`` square exactly as the trainer's loader does (so training
on the pack with ``--load-size size`` sees the same pixels up to JPEG's loss) and written at 85%
quality. ``pack.json`` records the size and counts. The output stays in an ignored folder: the
dataset's terms forbid committing its images or images made from them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import list_images, load_rgb, resize_square  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataroot", type=Path, help="folder with trainA/ and trainB/")
    source.add_argument("--fake", type=int, help="make this many random images per domain instead")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=286, help="the load size: images become size x size")
    p.add_argument("--quality", type=int, default=85)
    args = p.parse_args()
    counts = {}
    rng = np.random.default_rng(0)
    for domain in ("trainA", "trainB"):
        folder = args.out / domain
        folder.mkdir(parents=True, exist_ok=True)
        if args.fake:
            images = (Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(args.fake))
            names = [f"{i:04d}" for i in range(args.fake)]
        else:
            files = list_images(args.dataroot / domain)
            images, names = (load_rgb(f) for f in files), [f.stem for f in files]
        for name, img in zip(names, images, strict=True):
            resize_square(img, args.size).save(folder / f"{name}.jpg", quality=args.quality)
        counts[domain] = len(names)
    (args.out / "pack.json").write_text(json.dumps({"size": args.size, "quality": args.quality, "counts": counts}))
    print(json.dumps({"out": str(args.out), **counts}))  # noqa: T201 - a tool's report
    return 0


if __name__ == "__main__":
    sys.exit(main())
