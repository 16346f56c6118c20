"""CLI round trip and CLI start-up: whole-process wall time, each command interleaved with its
baselines round by round, so that the machine's noise falls on all of them alike."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time

from bench.common import (
    HOST,
    OPSBAY,
    REPO,
    BenchError,
    Row,
    Suite,
    iqr,
    private_bus,
    ratio,
    sec,
    summarize,
)
from bench.echo import ECHO_TOPIC, EchoResponder

ROUND_TRIP = """\
**CLI round trip**: wall time of the whole process `opsbay submit --target NODE --command true
--wait --wait-timeout 60` (the wait timeout only bounds the loop), from spawn to exit, against
a coordinator and one `opsbay worker` on a private Mosquitto. Baselines, in the same rounds
(the order rotates each round): `bench/oneshot.py`, a one-shot Python process that connects
with paho (MQTT 5, TCP_NODELAY), subscribes to a reply topic, publishes one QoS 1 request to
an echo responder and exits when the QoS 1 reply is in; and `mosquitto_rr` (C) doing the same.
The bus does more (a signed submission, a worker spawning `sh -c true`, four hops instead of
two), so the ratio says what the CLI and the bus add on top of Python + paho + one MQTT request."""

START_UP = """\
**CLI start-up**: wall time of `opsbay --help` and `opsbay submit --help` (interleaved rounds)
against `python -c pass` with the same interpreter. For reference, the same interpreter
importing `paho.mqtt.client`, `pydantic`, `typer` and `psutil` and nothing else."""


def timed(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 60) -> float:
    """Wall time of one run of `argv`, which must exit 0. A run killed by a signal is run again
    (twice at most): nothing here signals it, so another process on this busy machine did (pids
    are reused quickly with pid_max 32768)."""
    for _attempt in range(3):
        t0 = time.perf_counter()
        done = subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s
        )
        elapsed = time.perf_counter() - t0
        if done.returncode >= 0:
            break
        print(f"bench: {argv[0]} killed by signal {-done.returncode}; again", file=sys.stderr)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-500:]
        raise BenchError(f"{' '.join(argv[:3])}... exited {done.returncode}: {err}")
    return elapsed


def interleaved(
    commands: dict[str, list[str]], rounds: int, warm: int, env: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Run every command once per round, rotating the order; drop the warm-up rounds."""
    names = list(commands)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warm + rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            t = timed(commands[name], env)
            if i >= warm:
                samples[name].append(t)
    return samples


def round_trip(suite: Suite) -> list[Row]:
    rounds, warm = suite.pick(20, 3), suite.pick(3, 1)
    with private_bus(suite, "cli") as bus:
        bus.coordinator()
        bus.worker("cli-node")
        echo = EchoResponder(bus.port)
        try:
            cmds = {
                "opsbay": [str(OPSBAY), "submit", "--target", "cli-node", "--command", "true"],
                "paho": [sys.executable, str(REPO / "bench" / "oneshot.py"), str(bus.port)],
            }
            cmds["opsbay"] += ["--wait", "--wait-timeout", "60"]
            cmds["paho"].append(ECHO_TOPIC)
            rr = shutil.which("mosquitto_rr")
            if rr is not None:
                reply = f"bench/echo/reply/rr{secrets.token_hex(4)}"
                cmds["rr"] = [rr, "-h", HOST, "-p", str(bus.port), "-t", ECHO_TOPIC, "-e", reply]
                cmds["rr"] += ["-m", "ping", "-q", "1", "-W", "10"]
            s = interleaved(cmds, rounds, warm, bus.env())
            if suite.profile_dir is not None:
                from bench.profiling import pyinstrument

                out = suite.profile_dir / "cli-submit-wait.pyinstrument.txt"
                pyinstrument(cmds["opsbay"], out, bus.env())
                suite.say(f"profile: {out}")
        finally:
            echo.close()
    cli, paho = summarize(s["opsbay"]), summarize(s["paho"])
    rows = [
        Row(
            "CLI round trip",
            f"`opsbay submit --command true --wait`, median of {cli.n}",
            sec(cli.p50),
            iqr(cli, sec),
            f"one-shot paho {sec(paho.p50)}",
            ratio(cli.p50, paho.p50),
            "≤ 0.15 s and ≤ 2.5x one-shot paho",
            cli.p50 <= 0.15 and cli.p50 <= 2.5 * paho.p50,
        )
    ]
    if "rr" in s:
        rr_s = summarize(s["rr"])
        rows.append(
            Row(
                "CLI round trip",
                "baseline: one-shot paho request/reply process",
                sec(paho.p50),
                iqr(paho, sec),
                f"`mosquitto_rr` {sec(rr_s.p50)}",
                ratio(paho.p50, rr_s.p50),
            )
        )
        rows.append(
            Row("CLI round trip", "baseline: `mosquitto_rr`", sec(rr_s.p50), iqr(rr_s, sec))
        )
    else:
        rows.append(Row("CLI round trip", "baseline: `mosquitto_rr`", "not installed"))
    return rows


def startup(suite: Suite) -> list[Row]:
    rounds, warm = suite.pick(20, 3), suite.pick(2, 1)
    deps = "import paho.mqtt.client, pydantic, typer, psutil"
    cmds = {
        "help": [str(OPSBAY), "--help"],
        "submit_help": [str(OPSBAY), "submit", "--help"],
        "pass": [sys.executable, "-c", "pass"],
        "deps": [sys.executable, "-c", deps],
    }
    s = interleaved(cmds, rounds, warm)
    if suite.profile_dir is not None:
        from bench.profiling import importtime, pyinstrument

        for key in ("help", "submit_help"):
            out = suite.profile_dir / f"startup-{key}.importtime.txt"
            out.with_suffix(".summary.txt").write_text(importtime(cmds[key], out))
            pyinstrument(cmds[key], suite.profile_dir / f"startup-{key}.pyinstrument.txt", None)
            suite.say(f"profile: {out.with_suffix('.summary.txt')}")
    base = summarize(s["pass"])
    rows = []
    for key, label in (("help", "`opsbay --help`"), ("submit_help", "`opsbay submit --help`")):
        x = summarize(s[key])
        rows.append(
            Row(
                "CLI start-up",
                f"{label}, median of {x.n}",
                sec(x.p50),
                iqr(x, sec),
                f"`python -c pass` {sec(base.p50)}",
                ratio(x.p50, base.p50),
                "≤ 0.12 s",
                x.p50 <= 0.12,
            )
        )
    d = summarize(s["deps"])
    rows.append(
        Row(
            "CLI start-up",
            "reference: python importing paho, pydantic, typer, psutil",
            sec(d.p50),
            iqr(d, sec),
            f"`python -c pass` {sec(base.p50)}",
            ratio(d.p50, base.p50),
        )
    )
    rows.append(Row("CLI start-up", "baseline: `python -c pass`", sec(base.p50), iqr(base, sec)))
    return rows
