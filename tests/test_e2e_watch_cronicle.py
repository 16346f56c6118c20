"""`opsbay watch` and `opsbay cronicle` through a real Mosquitto, coordinator and workers.

The Cronicle checks hold the plugin's stdout to what Cronicle does with it (docs/Plugins.md and
lib/job.js in jhuckaby/Cronicle): stdout is split on "\\n"; a line matching
/^\\s*\\{.+\\}\\s*$/ (JavaScript: `.` stops at \\r, U+2028 and U+2029) is parsed as JSON and
merged into the job; anything else goes to the job log; the first `complete` line ends the job.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from opsbay_mqtt import signing
from opsbay_mqtt.protocol import NodeStatus, wire
from opsbay_mqtt.signing import Keyring
from tests.helpers import Bus, wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "cronicle_job.json"
KNOWN_KEYS = {"progress", "complete", "code", "description", "table"}
# What Cronicle takes for a JSON record, with JavaScript's `.` (no line terminators).
CRONICLE_RECORD = re.compile(r"^\s*\{[^\n\r\u2028\u2029]+\}\s*\Z")
LABELLED = re.compile(r"^\[([A-Za-z0-9][A-Za-z0-9._-]{0,62})\] (.*)\Z", re.DOTALL)
NOTE = re.compile(r"^opsbay: (.*)\Z", re.DOTALL)  # the plugin's own notes, in the log
GAP = "\u2026 "  # how a line saying that output is missing starts, after its `[node] `


# -- helpers


@dataclass
class Background:
    """An opsbay command running in the background, its stdout and stderr in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(encoding="utf-8")

    def stderr(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")

    def lines(self) -> list[str]:
        return self.stdout().splitlines()


def background(
    bus: Bus, name: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> Background:
    out, err = bus.tmp / f"{name}.out", bus.tmp / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsbay_mqtt", *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=o,
            stderr=e,
            env=bus.env(**(env or {})),
        )
    bus.procs.append(proc)  # stopped by the fixture whatever happens
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    return Background(proc, out, err)


def start_watch(bus: Bus, name: str, *args: str, **env: str) -> Background:
    w = background(bus, name, "watch", *args, env=env)
    wait_until(lambda: "opsbay: watching" in w.stderr(), 15, f"{name} to subscribe")
    return w


def finished(w: Background, timeout: float = 20) -> int:
    try:
        return w.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s; printed {w.lines()!r}") from None


def cronicle_input(**params: str) -> bytes:
    """The recorded Cronicle job with these params, as Cronicle sends it: one line, then EOL."""
    job = json.loads(FIXTURE.read_text(encoding="utf-8"))
    job["params"].update(params)
    return (json.dumps(job, separators=(",", ":")) + "\n").encode()


def plugin(bus: Bus, stdin: bytes, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt", "cronicle"],
        input=stdin,
        capture_output=True,
        env=bus.env(**env),
        timeout=90,
    )


@dataclass
class PluginRun:
    output: list[tuple[str, str]]  # (node, line)
    progress: list[float]
    complete: dict[str, Any]
    complete_line: str
    notes: list[str]
    log: list[str]  # every line in the order Cronicle gets it, records included

    def shown(self, node: str) -> list[str]:
        return [line for n, line in self.output if n == node]


def check_protocol(stdout: bytes) -> PluginRun:
    """Every line is `[node] ` output or an `opsbay: ` note (never a record for Cronicle), or
    a one-line JSON object with known keys; progress never goes back; one `complete`, last."""
    text = stdout.decode("utf-8")
    assert text.endswith("\n"), f"the last line is not terminated: {text!r}"
    output: list[tuple[str, str]] = []
    notes: list[str] = []
    records: list[tuple[str, dict[str, Any]]] = []
    log = text[:-1].split("\n")
    for line in log:
        labelled = LABELLED.match(line)
        note = NOTE.match(line)
        if labelled or note:
            assert not CRONICLE_RECORD.match(line)
            if labelled:
                output.append((labelled.group(1), labelled.group(2)))
            else:
                notes.append(line)
            continue
        assert CRONICLE_RECORD.match(line), f"neither output nor a record: {line!r}"
        record = json.loads(line)
        assert isinstance(record, dict) and set(record) <= KNOWN_KEYS, line
        records.append((line, record))
    progress = [r["progress"] for _, r in records if "progress" in r]
    assert all(isinstance(p, float | int) and 0 <= p <= 1 for p in progress), progress
    assert progress == sorted(progress), progress
    completes = [i for i, (_, r) in enumerate(records) if "complete" in r]
    assert completes == [len(records) - 1], f"one complete line, last: {records!r}"
    line, complete = records[-1]
    assert text.endswith(line + "\n"), "output after the complete line"
    assert complete["complete"] == 1 and type(complete["code"]) is int
    assert isinstance(complete["description"], str) and complete["description"]
    return PluginRun(output, progress, complete, line, notes, log)


def results(bus: Bus) -> list[dict[str, Any]]:
    out = bus.cli("results", "--json")
    return json.loads(out.stdout) if out.returncode == 0 else []


# -- watch


def test_watch_json_shows_a_jobs_events_and_a_node_going_offline(running: Bus) -> None:
    w = start_watch(running, "watch", "--json", "--count", "5")
    out = running.cli("submit", "-t", "n1", "-c", "echo watched", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    # Signed, but naming another node than its topic: not shown. Then a status nobody
    # signed: shown, but not as verified.
    elsewhere = NodeStatus(node="n8", state="online", session=1, published_ms=1)
    signed = signing.sign(wire(elsewhere), Keyring.shared(running.secret), 1)
    forged = json.dumps({**wire(elsewhere), "node": "n9"}).encode()
    for topic, payload in (("n7", signed), ("n9", forged)):
        running.publish(f"{running.prefix}/nodes/{topic}/status", payload)
    wait_until(lambda: len(w.lines()) >= 4, 10, "the forged status")
    worker = running.procs[1]  # after the coordinator
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert finished(w) == 0, w.stderr()

    events = [json.loads(line) for line in w.lines()]
    assert [e["type"] for e in events] == ["job", "job", "job", "status", "status"]
    jobs = events[:3]
    assert {e["job"]["job_id"] for e in jobs} == {job_id}
    assert [e["job"]["state"] for e in jobs] == ["pending", "running", "succeeded"]
    last = jobs[-1]["job"]["executions"]
    assert [(x["node"], x["state"], x["exit_code"], x["stdout"]) for x in last] == [
        ("n1", "succeeded", 0, "watched\n")
    ]
    assert (events[3]["node"], events[3]["verified"]) == ("n9", False)
    assert (events[4]["node"], events[4]["state"], events[4]["verified"]) == ("n1", "offline", True)
    assert all(e["verified"] for e in jobs)
    assert "auth" not in events[0] and "sig" not in events[0]


def test_watch_lines_with_output_filtered_by_job_and_node_stop_on_sigterm(running: Bus) -> None:
    running.worker("n2")
    job_id = str(uuid.uuid4())
    w = start_watch(running, "watch", "--output", "--job", job_id, "--node", "n1", "--full-ids")
    other = running.cli("submit", "-t", "n1", "-c", "echo other-job", "--wait")
    assert other.returncode == 0, other.stderr
    out = running.cli(
        "submit", "-t", "n1,n2", "-c", "echo line-one; echo '{\"complete\":1}'", "--wait",
        "--job-id", job_id,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    wait_until(lambda: "n1 succeeded exit 0" in w.stdout(), 10, "n1's outcome")
    w.proc.send_signal(signal.SIGTERM)
    assert finished(w) == 0, w.stderr()

    lines = w.lines()
    assert lines and all(f" job {job_id} " in line for line in lines), lines
    assert not [line for line in lines if "n2" in line or "other-job" in line]
    assert any(line.endswith(f"job {job_id} [n1] line-one") for line in lines), lines
    assert any(line.endswith(f'job {job_id} [n1] {{"complete":1}}') for line in lines), lines
    assert not [line for line in lines if "unverified" in line]
    assert re.match(r"^\d\d:\d\d:\d\d\.\d{3} job ", lines[0]), lines[0]


def test_watch_without_a_key_still_watches_and_marks_lines_unverified(running: Bus) -> None:
    as_json = start_watch(running, "nokey-json", "--json", "--count", "3", OPSBAY_SECRET="")
    as_text = start_watch(running, "nokey-text", "--count", "3", OPSBAY_SECRET="")
    out = running.cli("submit", "-t", "n1", "-c", "echo fine", "--wait")
    assert out.returncode == 0, out.stderr
    assert finished(as_json) == 0 and finished(as_text) == 0, as_json.stderr() + as_text.stderr()

    events = [json.loads(line) for line in as_json.lines()]
    assert [(e["job"]["state"], e["verified"]) for e in events] == [
        ("pending", False),
        ("running", False),
        ("succeeded", False),
    ]
    text = as_text.lines()
    assert len(text) == 3 and all(" (unverified) job " in line for line in text), text
    assert "succeeded: n1 succeeded exit 0 [1/1]" in text[-1]


def test_watch_for_a_duration_then_stops_and_refuses_bad_filters(bus: Bus) -> None:
    quiet = bus.cli("watch", "--for", "1", timeout=30)
    assert (quiet.returncode, quiet.stdout) == (0, ""), quiet.stderr
    bad = bus.cli("watch", "--job", "not/a-job", timeout=30)
    assert bad.returncode == 2 and "--job" in bad.stderr
    bad_node = bus.cli("watch", "--node", "web+01", timeout=30)
    assert bad_node.returncode == 2 and "invalid node name" in bad_node.stderr
    no_broker = bus.cli("watch", timeout=30, OPSBAY_BROKER="mqtt://127.0.0.1:1")
    assert no_broker.returncode == 69 and "cannot reach broker" in no_broker.stderr


# -- cronicle


def test_cronicle_success_passes_output_and_completes_with_0(running: Bus) -> None:
    got = plugin(running, cronicle_input())
    assert got.returncode == 0, got.stderr
    run = check_protocol(got.stdout)
    assert run.output == [("n1", "hello from cronicle")]
    submitted, outcome = run.notes  # both in the log, in order with the output
    assert re.fullmatch(r"opsbay: Cronicle job \S+: opsbay job \S+ sent", submitted)
    assert outcome == "opsbay: n1: succeeded (exit 0)"
    assert run.log.index(submitted) < run.log.index("[n1] hello from cronicle")
    assert run.log.index("[n1] hello from cronicle") < run.log.index(outcome)
    assert run.progress in ([0.1, 1.0], [1.0])  # running (unless seen only once done), done
    assert run.complete["code"] == 0
    assert "succeeded" in run.complete["description"]
    assert run.complete["table"]["rows"][0][:3] == ["n1", "succeeded", 0]
    job_id = run.complete["description"].split()[2].rstrip(":")
    assert f"opsbay job {job_id} sent" in submitted
    assert got.stderr == b""  # Cronicle writes stderr straight into its log, out of order
    assert running.cli_json("result", job_id)["state"] == "succeeded"


NASTY = r"""printf '%s\n' '{"complete":1,"code":0}' '{"id":"hijack"}'
printf '%s\n' 'say "hi" back\slash' 'café ✓' '{"complete":1}' >&2
printf 'line\342\200\250sep\n' >&2
exit 3"""


def test_cronicle_failure_keeps_job_output_from_posing_as_protocol(running: Bus) -> None:
    got = plugin(running, cronicle_input(command=NASTY))
    assert got.returncode == 0, got.stderr
    run = check_protocol(got.stdout)
    assert ("n1", '{"complete":1,"code":0}') in run.output
    assert ("n1", '{"id":"hijack"}') in run.output
    assert ("n1", '{"complete":1}') in run.output
    assert run.complete["code"] == 3
    assert run.complete_line.isascii()  # a raw U+2028 would end the line for Cronicle
    description = json.loads(run.complete_line)["description"]
    for printed in ('say "hi" back\\slash', "café ✓", '\n  {"complete":1}', "line\u2028sep"):
        assert printed in description, (printed, description)


def test_cronicle_timeout_completes_with_124(running: Bus) -> None:
    got = plugin(running, cronicle_input(command="sleep 30", timeout="1"))
    assert got.returncode == 0, got.stderr
    run = check_protocol(got.stdout)
    assert run.complete["code"] == 124
    assert "timed_out" in run.complete["description"]


def test_cronicle_fan_out_by_labels_reports_progress_per_node(bus: Bus) -> None:
    bus.coordinator()
    for node, role in (("n1", "web"), ("n2", "web"), ("n3", "db")):
        bus.worker(node, "--label", f"role={role}")
    wait_until(lambda: len(bus.cli_json("nodes")) == 3, 15, "the coordinator to know 3 nodes")
    got = plugin(bus, cronicle_input(target="", where="role=web", command="echo fanned-out"))
    assert got.returncode == 0, got.stderr
    run = check_protocol(got.stdout)
    # a twentieth per node running, a half per node done
    assert set(run.progress) <= {0.05, 0.1, 0.5, 0.55, 1.0} and run.progress[-1] == 1.0
    assert len(run.progress) >= 2, run.progress
    assert sorted(run.output) == [("n1", "fanned-out"), ("n2", "fanned-out")]
    assert run.complete["code"] == 0
    assert sorted(row[0] for row in run.complete["table"]["rows"]) == ["n1", "n2"]


def test_cronicle_abort_cancels_the_job(running: Bus) -> None:
    p = background(running, "plugin", "cronicle", stdin=cronicle_input(command="sleep 61"))

    def running_job() -> dict[str, Any] | None:
        return next((j for j in results(running) if j["state"] == "running"), None)

    job = wait_until(running_job, 15, "the job to run")
    assert job is not None
    wait_until(lambda: sleeping("61"), 10, "the job's process to run")
    p.proc.send_signal(signal.SIGTERM)  # what Cronicle's Abort does
    assert finished(p) == 0, p.stderr()
    run = check_protocol(p.out.read_bytes())
    assert run.complete["code"] == 80
    assert job["job_id"] in run.complete["description"]
    wait_until(
        lambda: running.cli_json("result", job["job_id"])["state"] == "cancelled",
        15,
        "the job to end cancelled",
    )
    wait_until(lambda: not sleeping("61"), 10, "the job's process to be gone")


def sleeping(seconds: str) -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline", "status"])
        if p.info["cmdline"] == ["sleep", seconds] and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


@pytest.mark.parametrize(
    "stdin",
    [b"", b"not json\n", b"[1, 2]\n", b'{"id": "jx1"}\n', b'{"params": "x"}\n', b"\xff\xfe\n"],
)
def test_cronicle_refuses_what_is_not_a_cronicle_job(bus: Bus, stdin: bytes) -> None:
    got = plugin(bus, stdin)
    assert got.returncode == 2
    run = check_protocol(got.stdout)
    assert run.complete["code"] == 2
    assert "Cronicle job" in run.complete["description"]
    assert run.output == [] and run.progress == []


@pytest.mark.parametrize(
    ("params", "env", "code", "says"),
    [
        ({"command": ""}, {}, 2, "'command' is empty"),
        ({"target": "", "where": ""}, {}, 2, "'target' and 'where'"),
        ({"timeout": "soon"}, {}, 2, "param 'timeout'"),
        ({"batch": "lots"}, {}, 2, "'batch'"),
        ({"where": "no-equals-sign"}, {}, 2, "param 'where'"),
        ({"target": "web/01"}, {}, 2, "invalid node name"),
        ({}, {"OPSBAY_SECRET": ""}, 78, "no key"),
        ({}, {"OPSBAY_BROKER": "mqtt://127.0.0.1:1"}, 69, "broker"),
    ],
)
def test_cronicle_reports_bad_params_and_settings_to_cronicle(
    bus: Bus, params: dict[str, str], env: dict[str, str], code: int, says: str
) -> None:
    got = plugin(bus, cronicle_input(**params), **env)
    assert got.returncode == 0, got.stderr  # Cronicle reads the outcome from the JSON
    run = check_protocol(got.stdout)
    assert run.complete["code"] == code
    assert says in run.complete["description"]


def seq_problems(lines: list[str], last: int) -> list[str]:
    """What is wrong with `seq 1 last` as shown: a line seq never printed, a line shown twice or
    out of order, lines left out with no line saying so."""
    problems: list[str] = []
    expected, said_missing, seen = 1, False, set()
    for line in lines:
        if line.startswith(GAP):
            said_missing = True
            continue
        if not (line.isdigit() and 1 <= int(line) <= last):
            problems.append(f"a line seq never printed: {line!r}")
            continue
        n = int(line)
        if n in seen:
            problems.append(f"shown twice: {n}")
        elif n < expected:
            problems.append(f"out of order: {n} after {expected - 1}")
        elif n > expected and not said_missing:
            problems.append(f"{expected}..{n - 1} left out, nothing says so")
        seen.add(n)
        expected, said_missing = max(expected, n + 1), False
    if expected <= last and not said_missing:
        problems.append(f"{expected}..{last} left out at the end, nothing says so")
    return problems


def test_cronicle_large_fast_output_is_shown_once_in_order_or_says_what_is_missing(
    running: Bus,
) -> None:
    """Issue 11, 7: `seq 1 100000` on two nodes, far beyond the live rate limit and the
    stored result's head and tail."""
    last = 100_000
    running.worker("n2")
    got = plugin(running, cronicle_input(target="n1,n2", command=f"seq 1 {last}"))
    assert got.returncode == 0, got.stderr
    run = check_protocol(got.stdout)
    assert run.complete["code"] == 0, run.complete

    problems = {node: seq_problems(run.shown(node), last) for node in ("n1", "n2")}
    kinds = {node: Counter(re.sub(r"'.*'|\d+", "#", x) for x in p) for node, p in problems.items()}
    assert problems == {"n1": [], "n2": []}, (
        f"{kinds}; the first: { {n: p[:4] for n, p in problems.items()} }"
    )
    for node in ("n1", "n2"):
        numbers = [int(line) for line in run.shown(node) if not line.startswith(GAP)]
        assert numbers[0] == 1 and numbers[-1] == last, (node, numbers[:3], numbers[-3:])
        if len(numbers) < last:  # beyond what live output and the stored result keep
            assert any("bytes" in line for line in run.shown(node) if line.startswith(GAP))

    # The log in order: each node's outcome after all of its output, progress while they run.
    for node in ("n1", "n2"):
        outcome = run.log.index(f"opsbay: {node}: succeeded (exit 0)")
        assert not [x for x in run.log[outcome:] if x.startswith(f"[{node}] ")], node
    first_outcome = min(i for i, x in enumerate(run.log) if NOTE.match(x) and "succeeded" in x)
    assert any('"progress"' in x for x in run.log[:first_outcome]), run.log[:first_outcome][-5:]
    assert run.progress[-1] == 1.0


@pytest.mark.parametrize("follow", ["--follow", "--no-follow"])
def test_submit_wait_large_fast_output_is_shown_once_in_order_or_says_what_is_missing(
    running: Bus, follow: str
) -> None:
    """The same through `submit --wait`, which assembles output the same way."""
    last = 100_000
    running.worker("n2")
    got = running.cli("submit", "-t", "n1,n2", "-c", f"seq 1 {last}", "--wait", follow)
    assert got.returncode == 0, got.stderr
    shown: dict[str, list[str]] = {"n1": [], "n2": []}
    for line in got.stdout.splitlines():
        labelled = LABELLED.match(line)
        assert labelled, line
        shown[labelled.group(1)].append(labelled.group(2))
    problems = {node: seq_problems(lines, last)[:4] for node, lines in shown.items()}
    assert problems == {"n1": [], "n2": []}
    assert {line for line in got.stderr.splitlines() if ": succeeded (exit 0)" in line} == {
        "opsbay: n1: succeeded (exit 0)",
        "opsbay: n2: succeeded (exit 0)",
    }


def test_cronicle_with_no_coordinator_gives_up_at_opsbay_ack_timeout(bus: Bus) -> None:
    """Cronicle passes its environment to the plugin: OPSBAY_ACK_TIMEOUT bounds the wait for an
    acknowledgement, as for `opsbay submit`, and the log says why it ended."""
    got = plugin(bus, cronicle_input(), OPSBAY_ACK_TIMEOUT="3s")  # within plugin()'s 90 s
    assert got.returncode == 0, got.stderr
    run = check_protocol(got.stdout)
    assert run.complete["code"] == 69, run.complete
    assert "will never run" in run.complete["description"]
    assert re.search(r"acknowledged the submission within \d+ s", run.complete["description"])
