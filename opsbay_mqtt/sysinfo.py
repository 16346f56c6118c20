"""Facts about this host, from psutil and the platform module."""

from __future__ import annotations

import os
import platform
import socket
import time
from typing import Any

import psutil


def _distro() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            fields = dict(
                line.rstrip("\n").split("=", 1) for line in f if "=" in line and line[0] != "#"
            )
    except OSError:
        return platform.platform(terse=True)
    return fields.get("PRETTY_NAME", fields.get("NAME", "")).strip('"')


def facts(disk_path: str = "/") -> dict[str, Any]:
    """What a node tells the fleet about itself. Integers only: it travels in signed messages."""
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(disk_path)
    boot = int(psutil.boot_time())
    try:
        load = [int(x * 100) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "hostname": socket.gethostname(),
        "os": platform.system(),
        "distro": _distro(),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "boot_time": boot,
        "uptime_s": max(0, int(time.time()) - boot),
        "cpu_count": psutil.cpu_count() or 0,
        "load_x100": load,
        "memory_total": mem.total,
        "memory_available": mem.available,
        "disk_path": disk_path,
        "disk_total": disk.total,
        "disk_free": disk.free,
    }
