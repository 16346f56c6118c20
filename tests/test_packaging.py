"""What `pip install` gives someone without a clone: the wheel carries the Mosquitto configs
that `opsbay stack` starts its broker from."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_shipped_mosquitto_configs(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("opsbay_mqtt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("mosquitto.conf", "production.conf", "docker.conf", "acl.example"):
        assert f"opsbay_mqtt/mosquitto/{name}" in names, sorted(names)
        shipped = zipfile.ZipFile(wheel).read(f"opsbay_mqtt/mosquitto/{name}")
        assert shipped == (ROOT / "mosquitto" / name).read_bytes()
