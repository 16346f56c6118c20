"""The worker agent's own process image.

`opsbay worker` parses and checks its options, then replaces itself (same pid, output,
environment and working directory: a service manager sees no difference) with
`python -m opsbay_mqtt.agent`, which runs the worker without the CLI's parser: typer and click
would otherwise stay in the memory of every node's agent, about 2 MB of its ~40, for nothing.

The options travel in an anonymous in-memory file (memfd) inherited across the exec, never in
the command line or the environment, since they may hold the shared secret. Where there is no
memfd (not Linux) or the exec fails, `become` returns and the worker runs in the CLI's process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from opsbay_mqtt.lazymodules import defer_urllib_request

defer_urllib_request()  # the agent's entry point: before settings imports paho

from opsbay_mqtt.policy import WorkerPolicy  # noqa: E402
from opsbay_mqtt.settings import BusOptions  # noqa: E402

log = logging.getLogger(__name__)

_PATHS = frozenset(f.name for f in dataclasses.fields(BusOptions) if "Path" in str(f.type))


def become(bus: BusOptions, log_level: int, worker: dict[str, Any]) -> None:
    """Exec into the agent, which calls `daemons.run_worker(settings, **worker)`. Returns only
    when that cannot be done here."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return
    options = {
        "bus": {k: str(v) if isinstance(v, Path) else v for k, v in vars(bus).items()},
        "log_level": log_level,
        "worker": {
            **worker,
            "state_dir": str(worker["state_dir"]),
            "policy": dataclasses.asdict(worker["policy"]),
        },
    }
    try:
        fd = memfd_create("opsbay-worker-options", 0)
    except OSError:
        return
    try:
        data = json.dumps(options).encode()
        while data:
            data = data[os.write(fd, data) :]
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        # The node's name is only for `ps`: the agent reads everything from the file.
        argv = [sys.executable, "-m", "opsbay_mqtt.agent", str(fd), worker["node"]]
        os.execv(sys.executable, argv)
    except OSError as e:
        log.debug("running the worker in this process (no exec: %s)", e)
        os.close(fd)


def main(argv: list[str]) -> int:
    """Run the worker from the options `become` left in the file descriptor `argv[0]`."""
    from opsbay_mqtt.daemons import run_worker
    from opsbay_mqtt.errors import EXIT_USAGE, OpsbayError, exit_for
    from opsbay_mqtt.logs import setup_logging
    from opsbay_mqtt.settings import resolve

    try:
        with open(int(argv[0]), "rb") as f:  # closes it: jobs never inherit the options
            options = json.load(f)
    except (IndexError, ValueError, OSError) as e:
        print(f"opsbay: the worker agent is started by `opsbay worker` ({e})", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(options["log_level"])
    given: dict[str, Any] = {
        k: Path(v) if k in _PATHS and v else v for k, v in options["bus"].items()
    }
    bus = BusOptions(**given)
    worker = options["worker"]
    try:
        settings = resolve(bus, "node", worker["node"])
        run_worker(
            settings,
            **{
                **worker,
                "state_dir": Path(worker["state_dir"]),
                "policy": WorkerPolicy(
                    **{**worker["policy"], "allow": tuple(worker["policy"]["allow"])}
                ),
            },
        )
    except OpsbayError as e:
        code, text = exit_for(e) or (1, str(e))
        print(f"opsbay: {text}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
