"""Log set-up shared by the CLI and the worker agent: one line per record, to stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
