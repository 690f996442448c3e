"""Module boundaries that keep the layers honest: what imports what."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACT = {"service.contract", "service.repository"}
# These two run exported models through the served runtime: that is their job (export checks the ONNX file
# with the runtime that will serve it; evaluate measures what is served, with the one runner factory).
RUNTIME_USERS = {
    "export.py": CONTRACT | {"service.runtime"},
    "evaluate.py": CONTRACT | {"service.runtime", "service.imaging", "service.translate"},
}


def _imports(path: Path, packages: set[str]) -> set[str]:
    """Every module of ``packages`` that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in packages:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in packages)
    return found


def _service_imports(path: Path) -> set[str]:
    return _imports(path, {"service"})


def test_the_service_never_imports_torch_or_training() -> None:
    """Serving depends on onnxruntime (or OpenVINO) only: not even a lazy import of torch or the trainer."""
    for path in sorted((REPO_ROOT / "service").rglob("*.py")):
        bad = _imports(path, {"torch", "torchvision", "training"})
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {sorted(bad)}"


def test_training_imports_from_the_service_only_the_model_contract() -> None:
    for path in sorted((REPO_ROOT / "training").rglob("*.py")):
        allowed = RUNTIME_USERS.get(path.name, CONTRACT)
        assert _service_imports(path) <= allowed, f"{path.relative_to(REPO_ROOT)}: {_service_imports(path) - allowed}"


def test_batching_and_workers_run_without_the_web_framework() -> None:
    code = (
        "import sys, service.batching, service.workers, service.errors, service.admission; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
