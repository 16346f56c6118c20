"""transport: what importing it costs a process that never looks for a proxy."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import opsbay_mqtt.transport
before = sorted(m for m in ("http.client", "email.message", "tempfile") if m in sys.modules)
import urllib.request
from urllib.request import getproxies
proxies = urllib.request.getproxies()
print(json.dumps({
    "before": before,
    "real": type(sys.modules["urllib.request"]).__name__,
    "same": getproxies is sys.modules["urllib.request"].getproxies,
    "proxies": proxies,
}))
"""


def test_paho_is_imported_without_urllib_request_which_still_works_when_used() -> None:
    """paho imports urllib.request only to look for a proxy; the stand-in transport gives it
    must not import http.client and email up front, and must become the real module on use."""
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "http_proxy": "http://127.0.0.1:3128"},
    )
    got = json.loads(out.stdout)
    assert got["before"] == []
    assert got["real"] == "module"
    assert got["same"] is True
    assert got["proxies"] == {"http": "http://127.0.0.1:3128"}
