"""CLI round trip and CLI start-up: whole-process wall time, each command interleaved with its
baselines round by round, so that the machine's noise falls on all of them alike."""

from __future__ import annotations

import secrets
import shutil
import sys

from bench.common import (
    HOST,
    OPSBAY,
    Row,
    Suite,
    baseline,
    close_input,
    interleaved,
    iqr,
    private_bus,
    ratio,
    sec,
    summarize,
)

ECHO_TOPIC = "bench/echo/request"


def round_trip(suite: Suite) -> list[Row]:
    rounds, warm = suite.pick(20, 3), suite.pick(3, 1)
    with private_bus(suite, "cli") as bus:
        bus.coordinator()
        bus.worker("cli-node")
        echo = baseline(bus, "echo", ECHO_TOPIC)
        cmds = {
            "opsbay": [str(OPSBAY), "submit", "--target", "cli-node", "--command", "true"],
            "paho": [sys.executable, "-m", "bench.baseline", "oneshot", str(bus.port), ECHO_TOPIC],
        }
        cmds["opsbay"] += ["--wait", "--wait-timeout", "60"]
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
        close_input(echo)
    cli, paho = summarize(s["opsbay"]), summarize(s["paho"])
    fig = "CLI round trip"
    rows = [
        Row(
            fig,
            f"`opsbay submit --command true --wait`, median of {cli.n}",
            sec(cli.p50),
            iqr(cli, sec),
            f"one-shot paho {sec(paho.p50)}",
            ratio(cli.p50, paho.p50),
            "≤ 0.15 s and ≤ 2.5x one-shot paho",
            cli.p50 <= 0.15 and cli.p50 <= 2.5 * paho.p50,
        )
    ]
    if "rr" not in s:
        return [*rows, Row(fig, "baseline: `mosquitto_rr`", "not installed")]
    r = summarize(s["rr"])
    what = "baseline: one-shot paho request/reply process, one thread"
    vs_rr = (f"`mosquitto_rr` {sec(r.p50)}", ratio(paho.p50, r.p50))
    rows.append(Row(fig, what, sec(paho.p50), iqr(paho, sec), *vs_rr))
    return [*rows, Row(fig, "baseline: `mosquitto_rr`", sec(r.p50), iqr(r, sec))]


def startup(suite: Suite) -> list[Row]:
    rounds, warm = suite.pick(20, 3), suite.pick(2, 1)
    cmds = {
        "help": [str(OPSBAY), "--help"],
        "submit_help": [str(OPSBAY), "submit", "--help"],
        "pass": [sys.executable, "-c", "pass"],
        "deps": [sys.executable, "-c", "import paho.mqtt.client, pydantic, typer, psutil"],
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
    vs_pass = f"`python -c pass` {sec(base.p50)}"
    rows = []
    for key, label in (("help", "`opsbay --help`"), ("submit_help", "`opsbay submit --help`")):
        x = summarize(s[key])
        what = f"{label}, median of {x.n}"
        cells = (sec(x.p50), iqr(x, sec), vs_pass, ratio(x.p50, base.p50))
        rows.append(Row("CLI start-up", what, *cells, "≤ 0.12 s", x.p50 <= 0.12))
    d = summarize(s["deps"])
    what = "reference: python importing paho, pydantic, typer, psutil"
    rows.append(Row("CLI start-up", what, sec(d.p50), iqr(d, sec), vs_pass, ratio(d.p50, base.p50)))
    rows.append(Row("CLI start-up", "baseline: `python -c pass`", sec(base.p50), iqr(base, sec)))
    return rows
