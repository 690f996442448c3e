"""Fixtures of the end-to-end tests, reused from the service tests rather than copied.

``tests/service`` is not a package: its modules import their siblings by bare name
(``from service_fakes import ...``), which works there because pytest puts that folder on ``sys.path``.
Do the same here, so that ``test_server``'s helpers import whether or not ``tests/service`` was collected.
"""

from __future__ import annotations

import sys
from pathlib import Path

SERVICE_TESTS = Path(__file__).resolve().parents[1] / "service"
if str(SERVICE_TESTS) not in sys.path:
    sys.path.insert(0, str(SERVICE_TESTS))

from test_server import Server, run_server  # noqa: E402

from tests.service.conftest import image_factory, tiny_repo  # noqa: E402

__all__ = ["Server", "image_factory", "run_server", "tiny_repo"]
