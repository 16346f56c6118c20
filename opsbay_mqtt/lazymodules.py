"""Modules a process imports only when it uses them. Installed by the entry points (`cli.main`,
the worker agent), never as a side effect of importing a library module."""

from __future__ import annotations

import importlib
import sys
import types
import urllib
from typing import Any


class _ImportedOnFirstUse(types.ModuleType):
    """Stands in for a module until one of its attributes is used, then becomes it."""

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer_urllib_request() -> None:
    """paho imports urllib.request, and with it http.client, email and tempfile (10-18 ms of
    every `opsbay` call, 2 MB of every worker: docs/benchmarks.md), only to look for a proxy,
    which it does only when PySocks is installed. Until it is first used, a stand-in takes its
    place; call this before anything imports paho."""
    if "urllib.request" not in sys.modules:
        stand_in = _ImportedOnFirstUse("urllib.request")
        sys.modules["urllib.request"] = stand_in
        urllib.request = stand_in  # type: ignore[attr-defined]
