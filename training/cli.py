"""The ``dclgan`` command. Each subcommand's module is imported only when it runs, so that
``dclgan serve`` and ``dclgan translate`` (service side, onnxruntime) never import torch."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib import import_module

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("training.train_cli", "main", "train DCLGAN or SimDCL on an unpaired dataset"),
    "export": ("training.export", "main", "export a checkpoint's two generators to an ONNX model folder"),
    "import-official": (
        "training.export",
        "import_official_main",
        "turn the authors' released checkpoints into a model folder",
    ),
    "evaluate": ("training.evaluate", "main", "FID/KID of a model folder's translations against reference images"),
    "translate": ("service.translate", "main", "translate a folder of images offline with onnxruntime"),
    "serve": ("service.serve", "main", "run the HTTP service on the models in models/"),
    "doctor": ("training.doctor", "main", "check onnxruntime providers, CUDA/cuDNN, torch and CPU features"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="dclgan", description="DCLGAN/SimDCL training, export and serving.")
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for name, (_, _, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text, add_help=False)
        parser.parse_args(argv)  # prints help or the usage error and exits
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, func, _ = COMMANDS[argv[0]]
    entry: Callable[[list[str]], int] = getattr(import_module(module), func)
    return int(entry(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
