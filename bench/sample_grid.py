"""A thumbnail grid of a model's translations: each row is input | output for one image.

    python bench/sample_grid.py --model models/horse2zebra --direction horse2zebra \
        --inputs ../shared/data/horse2zebra/testA --count 6 --size 128 --out grid.png

Uses the service's inference core (onnxruntime). The horse2zebra test images are ImageNet photos
whose terms forbid copying them into this repository or its docs, so the bundled model card does
not ship such a grid: run this on your own copy of the data to look at the model's outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from service.repository import load_model_dir
from service.runtime import Engine
from service.translate import list_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--direction", required=True)
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--count", type=int, default=6)
    p.add_argument(
        "--size", type=int, default=128, help="working and thumbnail size (squashed, like the test protocol)"
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    files = list_images(args.inputs)[: args.count]
    inputs = [Image.open(f).convert("RGB").resize((args.size, args.size), Image.Resampling.BICUBIC) for f in files]
    engine = Engine.open(load_model_dir(args.model), directions=[args.direction])
    outputs = engine.translate(inputs, args.direction)
    grid = Image.new("RGB", (2 * args.size, args.size * len(inputs)), "white")
    for row, (src, dst) in enumerate(zip(inputs, outputs, strict=True)):
        grid.paste(src, (0, row * args.size))
        grid.paste(dst, (args.size, row * args.size))
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
