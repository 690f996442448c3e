"""Log format: text lines for a terminal (the default), or one JSON object per line for log shippers.

JSON mode swaps the formatter of the root logger's handlers, whoever installed them (``dclgan serve``
via ``training.cli``, or ``python -m service`` via ``service.serve``), so every record of every logger,
uvicorn's included, becomes one line. Fields passed with ``extra=`` (the access log's request id, stage
times and batch size, and its trace id when tracing is on) become keys of their own; text mode leaves them
out, so its lines stay as they were.
"""

from __future__ import annotations

import logging

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from service.config import LogFormat


def json_formatter() -> logging.Formatter:
    """Time (ISO 8601, UTC), level, logger and message, then any ``extra`` fields but uvicorn's
    ``color_message`` (the message again, with terminal colour codes)."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
    )


def configure(log_format: LogFormat) -> None:
    """Apply ``log_format`` to every handler of the root logger (installed before this is called)."""
    if log_format == "json":
        formatter = json_formatter()
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter)
