"""Structured logging: one JSON object per line, request ids through contextvars.

Every process calls ``configure_logging`` once. structlog events and stdlib
``logging`` records (grpc, transformers, diffusers) go through one renderer, so
a log collector sees one format. Values under secret-looking keys are masked,
and tracebacks never include local variables (they may hold credentials).

``VIDALIGN_LOG_FORMAT=console`` switches to a human-readable renderer;
``VIDALIGN_LOG_LEVEL`` sets the level (default INFO).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api[_-]?key|access[_-]?key|credential)", re.I)


def _mask_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in event:
        if _SECRET_KEY.search(key):
            event[key] = "***"
    return event


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Route structlog and stdlib logging to stderr through one renderer."""
    level = (level or os.environ.get("VIDALIGN_LOG_LEVEL", "INFO")).upper()
    fmt = fmt or os.environ.get("VIDALIGN_LOG_FORMAT", "json")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_secrets,
    ]
    if fmt == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        exceptions: list[Any] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        exceptions = [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exceptions,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that chatter at INFO are kept at WARNING unless asked for DEBUG.
    if level != "DEBUG":
        for noisy in ("httpx", "urllib3", "filelock", "DeepSpeed", "torch.distributed"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
