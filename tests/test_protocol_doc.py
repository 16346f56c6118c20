"""Keeps docs/protocol.md true: its test vectors, example key file, examples, field tables, reason
codes, topic table, states, client ids and limits are checked against the code; the examples' job
(fan-out in batches, partial job events, cancel) is replayed through a coordinator stepped by
hand; and its shell example is run against a real bus, with the shared secret, a client key, and
a glob target with labels and a batch."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
import secrets
import shutil
import subprocess
import tempfile
import uuid
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest

from opsbay_mqtt import keys, models, queries, rollout, signing, states
from opsbay_mqtt.client import Client, ClientConfig
from opsbay_mqtt.coordinator import Coordinator, CoordinatorConfig
from opsbay_mqtt.daemons import client_id
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import (
    MAX_EXECUTIONS,
    MESSAGE_TYPES,
    Cancel,
    Execution,
    Job,
    Message,
    Query,
    Rejected,
    Result,
    Schedule,
    ScheduleRun,
    ScheduleSpec,
    Submit,
    decode,
    encode,
    wire,
)
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import JOB_ID_RE, Topics
from opsbay_mqtt.transport import BrokerURL, Inbound
from tests.helpers import Bus, Watcher, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
TEST_SECRET = b"opsbay-test-secret"
TEST_KEYRING = signing.Keyring.shared(TEST_SECRET)
SHELL_MARKER = "# opsbay: submit from the shell"

# A fenced block: ```<lang> <info>\n<body>\n```
FENCE = re.compile(r"^```(?P<lang>\w*)(?P<info>[^\n]*)\n(?P<body>.*?)\n```$", re.M | re.S)
BLOCKS = [(m["lang"], m["info"].strip(), m["body"]) for m in FENCE.finditer(DOC)]


def vectors() -> dict[str, dict[str, str]]:
    """{name: {role: body}} from blocks tagged `vector:<name>:<role>`."""
    out: dict[str, dict[str, str]] = {}
    for _, info, body in BLOCKS:
        if info.startswith("vector:"):
            _, name, role = info.split(":")
            out.setdefault(name, {})[role] = body
    return out


VECTORS = vectors()
EXAMPLES = {info.split(":", 1)[1]: body for _, info, body in BLOCKS if info.startswith("example:")}


def table(marker: str) -> list[list[str]]:
    """The rows (cells stripped) of the Markdown table right after `<!-- marker -->` (the table
    may be indented, as in a list item)."""
    found = re.search(rf"^ *<!-- {re.escape(marker)} -->\n((?: *\|.*\n)+)", DOC, re.M)
    assert found, f"no table after <!-- {marker} --> in docs/protocol.md"
    rows = found[1].splitlines()[2:]  # skip the header and the |---| line
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]


def unquote(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), f"expected `code` in {cell!r}"
    return cell[1:-1]


def codes(cell: str) -> list[str]:
    """Every `code` span in a cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is not installed (sudo apt-get install -y jq openssl mosquitto-clients)"
        )
    return path


# -- the example key file, as the reference loader reads it
def keyfile_text() -> str:
    found = [b for lang, info, b in BLOCKS if lang == "toml" and info == "keyfile"]
    assert len(found) == 1, "expected one ```toml keyfile block"
    return found[0]


@functools.cache
def example_keys() -> keys.KeyFile:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "keys.toml"
        path.write_text(keyfile_text(), encoding="utf-8")
        path.chmod(0o600)  # opsbay refuses key files others can read
        return keys.load(path)


def example_keyring() -> signing.Keyring:
    """Every key of the example key file, and the test vectors' shared secret."""
    return keys.keyring(example_keys(), TEST_SECRET, None)


def test_example_key_file_is_what_the_loader_reads() -> None:
    file = example_keys()
    who = {kid: (i.kind, i.name) for kid, i, _ in file.keys}
    assert who == {"ci-20260101-7c3e": ("client", "ci"), "web-01-20260101-a41b": ("node", "web-01")}
    assert set(file.clients) == {"ci"}
    # A party signs with the last of its keys in its file.
    assert file.signing_kid("client") == "ci-20260101-7c3e"
    assert file.signing_kid("node", "web-01") == "web-01-20260101-a41b"


# -- a. test vectors
def vector_key(v: dict[str, str]) -> bytes:
    """The HMAC key of a vector: its `key-hex` part, else the shared test secret."""
    return bytes.fromhex(v["key-hex"].strip()) if "key-hex" in v else TEST_SECRET


def test_the_required_vectors_are_there() -> None:
    assert {"submit", "unicode", "order", "client-key"} <= set(VECTORS)
    for name, parts in VECTORS.items():
        assert {"input", "canonical", "canonical-hex", "sig"} <= set(parts), name
    assert json.loads(VECTORS["submit"]["input"])["type"] == "submit"
    command = json.loads(VECTORS["unicode"]["input"])["command"]
    assert "\x7f" in command
    assert any(ord(c) > 0x7F for c in command) and any(ord(c) > 0xFFFF for c in command)


def test_client_key_vector_uses_the_example_key_files_client_key() -> None:
    v = VECTORS["client-key"]
    kid = json.loads(v["input"])["auth"]["kid"]
    (secret,) = [s for k, who, s in example_keys().keys if k == kid and who.kind == "client"]
    assert vector_key(v) == secret and len(secret) == 32
    # The same message as vector `submit`, but for its key.
    strip = lambda text: {k: x for k, x in json.loads(text).items() if k != "auth"}  # noqa: E731
    assert strip(v["input"]) == strip(VECTORS["submit"]["input"])
    # The 64 hex characters used as text are a different key: a refused signature.
    assert signing.mac(v["key-hex"].strip().encode(), json.loads(v["input"])) != v["sig"].strip()


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_matches_signing(name: str) -> None:
    v = VECTORS[name]
    obj = json.loads(v["input"])
    canonical = signing.canonical(obj)
    assert canonical == v["canonical"].encode("utf-8")
    assert canonical == bytes.fromhex("".join(v["canonical-hex"].split()))
    assert signing.mac(vector_key(v), obj) == v["sig"].strip()


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_matches_jq_and_openssl(name: str) -> None:
    v = VECTORS[name]
    jq = subprocess.run(
        [need("jq"), "-jcS", "."], input=v["input"].encode(), capture_output=True, check=True
    ).stdout
    assert jq == v["canonical"].encode("utf-8")
    if "key-hex" in v:
        hmac = ["-mac", "HMAC", "-macopt", f"hexkey:{v['key-hex'].strip()}"]
    else:
        hmac = ["-hmac", TEST_SECRET.decode()]
    mac = subprocess.run(
        [need("openssl"), "dgst", "-sha256", *hmac], input=jq, capture_output=True, check=True
    ).stdout.decode()
    assert mac.split()[-1] == v["sig"].strip()


def test_submit_vector_wire_message_is_what_sign_makes_and_decode_accepts() -> None:
    v = VECTORS["submit"]
    signed = v["wire"].encode("utf-8")
    msg, auth = decode(signed, TEST_KEYRING, expect=(Submit,))
    assert json.loads(signed)["sig"] == v["sig"].strip()
    body = {k: x for k, x in json.loads(v["input"]).items() if k != "auth"}
    assert signing.sign(body, TEST_KEYRING, auth.ts, auth.nonce) == signed
    assert {k: x for k, x in wire(msg).items() if k in body} == body
    # "The submissions of the vectors leave out the fields that have a default": read as such.
    left_out = {k: x for k, x in wire(msg).items() if k not in body}
    assert left_out == {"where": {}, "batch": None, "max_failures": None, "accept_by_ms": None}


# -- the rest of the contract, checked against the code
UNSIGNED_AUTH = '"auth":{"kid":"default","nonce":"0123456789abcdef","ts":1},"sig":"' + "0" * 64


@pytest.mark.parametrize(
    "payload",
    [
        '{"v":1.0}',
        '{"v":1e3}',
        '{"v":NaN}',
        '{"v":1,"v":1}',
        '{"a":' * 32 + "1" + "}" * 32,  # the 1 is at level 33
        "{" + UNSIGNED_AUTH + '","x":"\\ud800"}',  # a lone surrogate: no canonical form
    ],
)
def test_receiver_refuses_as_bad_json_what_the_doc_says(payload: str) -> None:
    with pytest.raises(Refused) as refused:
        decode(payload.encode(), TEST_KEYRING)
    assert refused.value.code == "bad_json"


def test_command_limit_counts_utf8_bytes_as_the_doc_says() -> None:
    (row,) = [r for r in table("limits") if r[0] == "`command` length"]
    assert "bytes in UTF-8" in row[1]
    limit = int(re.search(r"`(\d+)`", row[1])[1])  # type: ignore[index]
    body = json.loads(VECTORS["submit"]["input"])
    del body["auth"]
    for command, ok in (("x" * limit, True), ("\u00e9" * (limit // 2 + 1), False)):
        wire = signing.sign({**body, "command": command}, TEST_KEYRING, 1767225600)
        if ok:
            decode(wire, TEST_KEYRING, expect=(Submit,))
        else:
            with pytest.raises(Refused, match="invalid"):
                decode(wire, TEST_KEYRING, expect=(Submit,))


# Who signs each message type, as the doc's "signers" table says: the client (its own key, or
# the shared secret) or the node the message is for or from. A `cancel` goes both ways: from a
# client without `node`, and from the coordinator to node N with N's key.
CLIENT_SIGNED = {"submit", "query", "schedule", "job", "reply", "rejected"}
NODE_SIGNED = {"dispatch", "result", "output", "info", "status"}
SIGNERS = {
    **{kind: {"client"} for kind in ("submit", "query", "schedule")},
    **{kind: {"coordinator"} for kind in ("job", "reply", "rejected", "dispatch")},
    **{kind: {"worker"} for kind in ("result", "output", "info", "status")},
    "cancel": {"client", "coordinator"},
}


def signed_by_client(kind: str, obj: dict[str, Any]) -> bool:
    """Whether a message is signed with a client's key (else with its node's)."""
    if kind == "cancel":
        return obj["node"] is None
    return kind in CLIENT_SIGNED


def test_signers_table_names_every_message_type_as_the_examples_use_them() -> None:
    by_type: dict[str, set[str]] = {}
    for row in table("signers"):
        for kind in re.findall(r"`([a-z]+)`", row[0]):
            by_type.setdefault(kind, set()).add(row[1].split()[0])
    assert set(SIGNERS) == set(MESSAGE_TYPES) == CLIENT_SIGNED | NODE_SIGNED | {"cancel"}
    assert by_type == SIGNERS


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_verifies_and_validates(name: str) -> None:
    obj = json.loads(EXAMPLES[name])
    kind = name.split("-")[0]
    assert obj["type"] == kind
    shown = {k: v for k, v in obj.items() if k not in ("auth", "sig")}
    if "auth" not in obj and "sig" not in obj:  # only refusals go unsigned
        assert kind == "rejected" and name.endswith("unsigned"), name
        msg = models.validate(MESSAGE_TYPES[kind], shown)
        assert shown == wire(msg), "examples show every field, as the code sends"
        with pytest.raises(Refused, match="unsigned"):
            decode(signing.canonical(shown), example_keyring())
        return
    msg, auth = decode(EXAMPLES[name].encode("utf-8"), example_keyring())
    assert shown == wire(msg), "examples show every field, as the code sends"
    # Signed as the doc's key rules say, with the example key file's keys.
    who = auth.identity
    assert who is not None, f"{name}: sign the examples with the example key file's keys"
    if signed_by_client(kind, obj):
        assert who.kind == "client", name
    else:
        assert (who.kind, who.name) == ("node", obj["node"]), name
    if kind == "job":
        assert auth.kid == obj["job"]["submitted_kid"], "job events: the submitter's key"


def test_every_message_type_has_an_example() -> None:
    assert {name.split("-")[0] for name in EXAMPLES} == set(MESSAGE_TYPES)
    assert "rejected-unsigned" in EXAMPLES
    cancels = [json.loads(body) for name, body in EXAMPLES.items() if name.startswith("cancel")]
    assert {c["node"] is None for c in cancels} == {True, False}, "a cancel in each direction"


MODELS: dict[str, type] = {
    **MESSAGE_TYPES,
    "job-object": Job,
    "execution-object": Execution,
    "schedule-spec-object": ScheduleSpec,
    "schedule-object": Schedule,
    "schedule-run-object": ScheduleRun,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_field_table_matches_the_model(name: str) -> None:
    fields = declared_fields(MODELS[name])
    rows = table(f"fields: {name}")
    # Every field, each once; in the order a reader expects (on the wire, keys are sorted).
    listed = [unquote(r[0]) for r in rows]
    assert sorted(listed) == sorted(fields) and len(set(listed)) == len(listed)
    for field, _type, required, _meaning in rows:
        default = fields[unquote(field)]
        on_the_wire = default is REQUIRED or unquote(field) in ("v", "type")  # decode needs both
        assert required.startswith("yes") == on_the_wire, field
        if not on_the_wire:
            shown = re.fullmatch(r"no \(default `(.*)`\)", required)
            assert shown, f"{field}: say the default as no (default `...`)"
            assert json.loads(shown[1]) == default, field


REQUIRED = object()
RESULT_FIELDS = {f.name for f in dataclasses.fields(Result)}


def declared_fields(model: type) -> dict[str, Any]:
    """A message's or record's fields, in order, with their defaults (REQUIRED)."""
    return {
        f.name: REQUIRED
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        else (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(model)
    }


def test_reason_code_table_lists_every_code_the_package_uses() -> None:
    source = "\n".join(p.read_text() for p in sorted((ROOT / "opsbay_mqtt").glob("*.py")))
    in_code = set(re.findall(r'Refused\(\s*"([a-z_]+)"', source))  # \s: across lines too
    in_code |= set(re.findall(r'\bcode="([a-z_]+)"', source))
    documented = [unquote(r[0]) for r in table("refusal-codes")]
    assert len(documented) == len(set(documented))
    assert set(documented) == in_code


def test_topic_table_matches_the_topics_module() -> None:
    t = Topics("opsbay")
    job, reply = "3f2b8c1e-9a4d-4e7b-8c21-5d6f7a8b9c0d", "c0123456789abcdef"
    built = {
        t.submit, t.rpc_request, t.rejected, t.rpc_reply(reply), t.node_jobs("web-01"),
        t.node_info("web-01"), t.node_status("web-01"), t.result("web-01", job),
        t.output("web-01", job), t.job_events(job),
    }  # fmt: skip
    rows = table("topics")
    documented: dict[str, list[str]] = {}
    for row in rows:
        topic = unquote(row[0])
        for placeholder, value in (
            ("<prefix>", "opsbay"), ("<node>", "web-01"), ("<job_id>", job), ("<reply_to>", reply)
        ):  # fmt: skip
            topic = topic.replace(placeholder, value)
        t.parse(topic)  # raises for a topic the code does not know
        documented[topic] = row
    assert set(documented) == built
    retained = {topic for topic, row in documented.items() if "yes" in row[2]}
    assert retained == {t.node_info("web-01"), t.node_status("web-01")}
    qos0 = {topic for topic, row in documented.items() if row[3].strip("*") == "0"}
    assert qos0 == {t.output("web-01", job)}  # live output; everything else QoS 1
    assert all(row[3] == "1" for topic, row in documented.items() if topic not in qos0)
    # The message types on each topic (what is in parentheses is a comment).
    types = {
        topic: set(re.findall(r"`([a-z]+)`", re.sub(r"\(.*?\)", "", row[4])))
        for topic, row in documented.items()
    }
    assert set().union(*types.values()) == set(MESSAGE_TYPES)
    assert types[t.submit] == {"submit", "cancel"}  # what the coordinator accepts there
    assert types[t.node_jobs("web-01")] == {"dispatch", "cancel"}  # ... and a worker
    assert types[t.output("web-01", job)] == {"output"}
    # The subscription for a job's live output from every node, as the doc names it.
    assert "`<prefix>/output/+/<job_id>`" in documented[t.output("web-01", job)][4]
    assert t.job_output(job) == f"opsbay/output/+/{job}"


def test_client_id_table_matches_the_code() -> None:
    rows = {row[0]: codes(row[1])[0] for row in table("client-ids")}
    assert set(rows) == {"coordinator", "worker", "CLI client"}
    topics = Topics("ops/bay")  # a prefix with levels: it appears as it is
    fill = {"<prefix>": topics.prefix, "<node>": "web-01"}
    for party, args in (("coordinator", ()), ("worker", ("web-01",))):
        expected = rows[party]
        for placeholder, value in fill.items():
            expected = expected.replace(placeholder, value)
        assert client_id(party, topics, *args) == expected, party
    keyring = signing.Keyring.shared("x")
    cli = Client(
        ClientConfig(url=BrokerURL.parse("mqtt://127.0.0.1"), topics=topics, keyring=keyring)
    )
    pattern = re.escape(rows["CLI client"]).replace(re.escape("<16 hex>"), "[0-9a-f]{16}")
    assert re.fullmatch(pattern, cli.conn.client_id), cli.conn.client_id
    assert cli.conn.client_id == f"opsbay-cli-{cli.reply_id}"


def test_limits_table_matches_the_constants() -> None:
    checked = 0
    for _limit, value, source in table("limits"):
        ref = re.fullmatch(r"`([a-z_]+)\.([A-Za-z_.]+)`", source)
        if ref is None:
            continue
        constant = attrgetter(ref[2])(importlib.import_module(f"opsbay_mqtt.{ref[1]}"))
        shown = re.search(r"`(\d+(?:\.\d+)?)`", value)
        assert shown, f"no `number` in {value!r}"
        assert float(shown[1]) == constant, source
        checked += 1
    assert checked >= 18


# -- targets, labels and rollout
def limit_row(label: str) -> str:
    (row,) = [r for r in table("limits") if r[0] == label]
    return row[1]


def test_target_label_and_rollout_limits_are_what_the_schema_enforces() -> None:
    shown = re.fullmatch(r"at most (\d+) comma-separated items of 1-(\d+) characters",
                         limit_row("`target`"))  # fmt: skip
    assert shown, limit_row("`target`")
    items, longest = int(shown[1]), int(shown[2])
    shown = re.match(r"at most (\d+) pairs; key 1-(\d+) of .*; value at most (\d+) characters",
                     limit_row("labels in `where` (of `submit` and `query`)"))  # fmt: skip
    assert shown
    pairs, key_len, value_len = int(shown[1]), int(shown[2]), int(shown[3])

    def ok(**fields: Any) -> bool:
        try:
            models.validate(Submit,
                {"v": 1, "type": "submit", "job_id": str(uuid.uuid4()), "command": "true",
                 "timeout_s": 5, "start_by_ms": 1, "target": "n1", **fields}
            )  # fmt: skip
            if "where" in fields:  # the same labels in a `nodes` query
                query = {"query": "nodes", "reply_to": "r", "correlation": "c"}
                models.validate(Query, {"v": 1, "type": "query", **query, "where": fields["where"]})
        except ValueError:
            return False
        return True

    item = "n" * longest
    assert ok(target=",".join([item] * items)) and not ok(target=",".join([item] * (items + 1)))
    assert not ok(target="n" * (longest + 1))
    labels = {f"k{i}": "v" for i in range(pairs)}
    assert ok(where=labels) and not ok(where={**labels, "one": "more"})
    assert ok(where={"k" * key_len: "v" * value_len})
    assert not ok(where={"k" * (key_len + 1): "v"}) and not ok(where={"k": "v" * (value_len + 1)})
    assert ok(where={"role.io/tier-1_x": ""})  # the key's characters: A-Z a-z 0-9 . _ / -
    assert not ok(where={"a b": "v"}) and not ok(where={"": "v"})
    # "Give a `target`, a `where`, or both (else `invalid`)"; globs only in `target`.
    assert not ok(target="") and not ok(target="", where={})
    assert ok(target="", where={"role": "web"}) and ok(target="web-*,db-0?")
    for bad in ("web 01", "web-01,", "a/b", "+", "#", "[ab]", "-web", "web-01, db-01"):
        assert not ok(target=bad), bad
    # `batch`, `max_failures`: 1-6 digits, optionally `%`; `batch` at least 1.
    for spec, good in (("1", True), ("25%", True), ("999999", True), ("0", False), ("0%", False),
                       ("1.5", False), ("10 %", False), ("1000000", False)):  # fmt: skip
        assert ok(batch=spec) == good, spec
        assert ok(max_failures=spec) == (good or spec in ("0", "0%")), spec


def test_target_resolution_is_what_the_doc_says() -> None:
    known = {"web-01": {"role": "web"}, "web-02": {"role": "web"}, "db-01": {"role": "db"}}
    resolve = rollout.resolve
    # A plain name is taken as it is, known or not; a glob matches known nodes only.
    assert resolve("web-09", {}, known) == ["web-09"]
    assert resolve("web-*", {}, known) == ["web-01", "web-02"]
    assert resolve("db-01,web-0?,web-01", {}, known) == ["db-01", "web-01", "web-02"]
    assert resolve("*01", {}, known) == ["db-01", "web-01"]  # `*` also matches nothing at all
    # Labels keep the nodes that have every pair; with no target every known node is a candidate.
    assert resolve("", {"role": "web"}, known) == ["web-01", "web-02"]
    assert resolve("web-01,db-01,web-09", {"role": "db"}, known) == ["db-01"]
    for target, where in (("WEB-*", {}), ("", {"role": "cache"}), ("web-09", {"role": "web"})):
        with pytest.raises(Refused) as refused:
            resolve(target, where, known)
        assert refused.value.code == "no_match"
    many: dict[str, dict[str, str]] = {f"n{i}": {} for i in range(MAX_EXECUTIONS + 1)}
    assert len(resolve("", {"x": ""}, {n: {"x": ""} for n in list(many)[:-1]})) == MAX_EXECUTIONS
    with pytest.raises(Refused) as refused:
        resolve("n*", {}, many)
    assert refused.value.code == "too_many_targets"


def test_rollout_rules_are_what_the_doc_says() -> None:
    found = re.search(
        r"^Failures are executions that ended (.+?)\s\(not\s`cancelled`\)", DOC, re.M | re.S
    )
    assert found, "no 'Failures are executions that ended ...' in docs/protocol.md"
    assert set(codes(found[1])) == rollout.FAILURES
    assert states.TERMINAL - {"succeeded", "cancelled"} == rollout.FAILURES

    def ex(node: str, state: str, dispatched: bool = True) -> Execution:
        return Execution(node=node, state=state, dispatched_ms=1 if dispatched else None)  # type: ignore[arg-type]

    held = [ex("c", "pending", False), ex("d", "pending", False)]
    one_out = [ex("a", "succeeded"), ex("b", "running"), *held]
    step = rollout.next_step
    # A sliding window of `batch` dispatched and unfinished; a share rounded up, at least 1.
    assert step(one_out, "2", None) == rollout.Step(["c"], [])
    assert step(one_out, "50%", None) == rollout.Step(["c"], [])  # 2 of 4
    assert step(one_out, "1%", None) == rollout.Step([], [])  # at least 1: b is out
    assert step(one_out, None, None) == rollout.Step(["c", "d"], [])
    # More than `max_failures` failed: what is held back is cancelled; a share rounded down.
    one_failed = [ex("a", "failed"), ex("b", "running"), *held]
    assert step(one_failed, "2", "1") == rollout.Step(["c"], [])  # 1 is not more than 1
    assert step(one_failed, "2", "25%") == rollout.Step(["c"], [])  # 25% of 4 = 1
    assert step(one_failed, "2", "24%") == rollout.Step([], ["c", "d"])  # 0.96 -> 0
    assert step(one_failed, "2", "0") == rollout.Step([], ["c", "d"])
    one_cancelled = [ex("a", "cancelled"), ex("b", "running"), *held]
    assert step(one_cancelled, "2", "0") == rollout.Step(["c"], [])  # cancelled is no failure


# -- the examples' job, replayed through a coordinator stepped by hand (no broker)
def example(name: str) -> dict[str, Any]:
    return dict(json.loads(EXAMPLES[name]))


def body(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("auth", "sig")}


class Stepped:
    """A coordinator on the example key file's keys (and the vectors' shared secret) under the
    prefix `opsbay`, every step at a given time in ms; returns what it publishes."""

    def __init__(self, tmp_path: Path) -> None:
        self.now_ms = 0
        cfg = CoordinatorConfig(
            topics=Topics("opsbay"), keyring=example_keyring(), clients=example_keys().clients
        )
        store = Store(tmp_path / "db.sqlite")
        self.c = Coordinator(cfg, store, clock=lambda: (self.now_ms + 0.5) / 1000)

    def node(self, name: str, labels: dict[str, str]) -> None:
        info = {"labels": labels, "agent_version": "0.1.0", "facts": {}}
        self.c.store.node_seen(name, 1, info=info)

    def send(self, topic: str, payload: bytes, at_ms: int) -> list[tuple[str, dict[str, Any]]]:
        self.now_ms = at_ms
        self.c.outbox.clear()
        self.c.handle(Inbound(topic, payload))
        return [(o.topic, json.loads(o.payload)) for o in self.c.outbox]

    def sign(self, msg: Message, kid: str) -> bytes:
        return encode(msg, self.c.cfg.keyring, self.now_ms // 1000, kid=kid)

    def report(self, job_id: str, ex: dict[str, Any], **update: Any) -> list[Any]:
        """The result of a node, made from an execution object as a job shows it, at the time
        it says (signed with the shared secret, which speaks for every node)."""
        fields = {k: v for k, v in {**ex, **update}.items() if k in RESULT_FIELDS}
        res = Result(job_id=job_id, **fields)
        at_ms = res.finished_ms if res.state != "running" and res.finished_ms else res.started_ms
        self.now_ms = at_ms or self.now_ms
        payload = self.sign(res, "default")
        return self.send(f"opsbay/results/{ex['node']}/{job_id}", payload, self.now_ms)


def on(out: list[tuple[str, dict[str, Any]]], topic: str, kind: str) -> list[dict[str, Any]]:
    return [body(b) for t, b in out if t == topic and b["type"] == kind]


def test_the_examples_job_replays_through_the_coordinator(tmp_path: Path) -> None:
    """The `submit` example on web-01..03 (and db-01, which `web-*` leaves out): the dispatch,
    the three `job` events and the reply of the examples are what the coordinator sends."""
    sub, accepted, progress, final = map(
        example, ("submit", "job-accepted", "job-progress", "job-succeeded")
    )
    finished = example("reply")["data"]  # the job at the end, with every execution
    by_node = {x["node"]: x for x in finished["executions"]}
    job_id, events = sub["job_id"], f"opsbay/jobs/{sub['job_id']}"
    bus = Stepped(tmp_path)
    labels = example("info")["labels"]
    assert sub["where"].items() <= labels.items()
    for node in by_node:
        bus.node(node, labels)
    bus.node("db-01", {**labels, "role": "db"})

    # Accepted: the first batch dispatched, the rest held back; the event has every execution.
    out = bus.send("opsbay/submit", EXAMPLES["submit"].encode(), accepted["job"]["submitted_ms"])
    assert on(out, events, "job") == [body(accepted)]
    assert accepted["counts"] == {"pending": accepted["total"]} and accepted["total"] == 3
    first = [x["node"] for x in accepted["job"]["executions"] if x["dispatched_ms"] is not None]
    assert len(first) == int(sub["batch"]) and len(by_node) > len(first)
    assert [t for t, b in out if b["type"] == "dispatch"] == [
        f"opsbay/nodes/{n}/jobs" for n in first
    ]
    dispatch = example("dispatch")
    assert on(out, f"opsbay/nodes/{dispatch['node']}/jobs", "dispatch") == [body(dispatch)]

    # Every later event carries only the executions that changed.
    seen = [body(accepted)]
    running = example("result-running")
    assert running["node"] == "web-01" == example("result-succeeded")["node"]
    payload = EXAMPLES["result-running"].encode()
    out = bus.send(f"opsbay/results/web-01/{job_id}", payload, running["started_ms"])
    (event,) = seen_now = on(out, events, "job")
    assert [(x["node"], x["state"]) for x in event["job"]["executions"]] == [("web-01", "running")]
    assert (event["counts"], event["total"]) == ({"pending": 2, "running": 1}, 3)
    seen += seen_now + on(bus.report(job_id, by_node["web-02"], state="running"), events, "job")
    (turn,) = [x for x in progress["job"]["executions"] if x["node"] not in first]
    payload = EXAMPLES["result-succeeded"].encode()  # web-01 done: web-03's turn
    out = bus.send(f"opsbay/results/web-01/{job_id}", payload, turn["dispatched_ms"])
    assert on(out, events, "job") == [body(progress)]
    assert [t for t, b in out if b["type"] == "dispatch"] == [f"opsbay/nodes/{turn['node']}/jobs"]
    after = sub["start_by_ms"] - accepted["job"]["submitted_ms"]
    assert turn["start_by_ms"] == turn["dispatched_ms"] + after  # as the doc says
    seen.append(body(progress))
    seen += on(bus.report(job_id, by_node["web-02"]), events, "job")
    seen += on(bus.report(job_id, by_node["web-03"], state="running"), events, "job")
    seen += on(bus.report(job_id, by_node["web-03"]), events, "job")
    assert seen[-1] == body(final)
    assert all(len(e["job"]["executions"]) == 1 for e in seen[2:] if e != body(progress))

    # "Keeping the whole picture": the events' executions, merged by node, are the whole job.
    picture: dict[str, Any] = {}
    for e in seen:
        picture.update({x["node"]: x for x in e["job"]["executions"]})
    assert len(picture) == final["total"] and picture == by_node
    assert final["job"]["state"] == finished["state"] == "succeeded"

    # The `result` query of the examples is answered with the `reply` example, every execution.
    reply = queries.answer(models.validate(Query, body(example("query"))), bus.c.store)
    assert wire(reply) == body(example("reply"))
    error = example("reply-error")
    missing = re.search(r"[0-9a-f-]{36}", error["error"])[0]  # type: ignore[index]
    q = models.validate(Query, {**body(example("query")), "job_id": missing})
    assert wire(queries.answer(q, bus.c.store)) == body(error)


def test_cancel_replays_through_the_coordinator(tmp_path: Path) -> None:
    """The `cancel` examples: the coordinator passes a client's cancel on to the node that runs
    the job, cancels what is held back at once, and refuses others' jobs and unknown ones."""
    cancel, to_node, killed = example("cancel"), example("cancel-node"), example("result-cancelled")
    assert cancel["node"] is None and to_node["job_id"] == killed["job_id"] == cancel["job_id"]
    job_id, node, ci = cancel["job_id"], to_node["node"], cancel["auth"]["kid"]
    events, rejected = f"opsbay/jobs/{job_id}", "opsbay/rejected"
    bus = Stepped(tmp_path)
    for n in ("web-01", "web-02", "web-03"):
        bus.node(n, example("info")["labels"])

    def submit(job: str, at_ms: int, kid: str = ci, **fields: Any) -> list[Any]:
        bus.now_ms = at_ms
        sub = Submit(
            job_id=job, command="deploy-app v12", timeout_s=900, start_by_ms=at_ms + 600_000,
            **{"target": node, **fields},
        )  # fmt: skip
        return bus.send("opsbay/submit", bus.sign(sub, kid), at_ms)

    def cancel_of(job: str, at_ms: int, kid: str = ci) -> list[Any]:
        bus.now_ms = at_ms
        return bus.send("opsbay/submit", bus.sign(Cancel(job_id=job), kid), at_ms)

    # A job running on its node: the node gets a cancel; the client the job, every execution.
    submit(job_id, killed["started_ms"] - 10)
    bus.report(job_id, {"node": node, "started_ms": killed["started_ms"]}, state="running")
    at = cancel["auth"]["ts"] * 1000 + 300
    out = bus.send("opsbay/submit", EXAMPLES["cancel"].encode(), at)
    assert [(t, body(b)) for t, b in out if b["type"] == "cancel"] == [
        (f"opsbay/nodes/{node}/jobs", body(to_node))
    ]
    (event,) = on(out, events, "job")
    assert [x["state"] for x in event["job"]["executions"]] == ["running"]  # the node decides
    payload = EXAMPLES["result-cancelled"].encode()
    out = bus.send(f"opsbay/results/{node}/{job_id}", payload, killed["finished_ms"])
    (event,) = on(out, events, "job")
    assert event["job"]["state"] == "cancelled" and event["counts"] == {"cancelled": 1}
    (ex,) = event["job"]["executions"]
    assert (ex["exit_code"], ex["reason"]) == (killed["exit_code"], killed["reason"])

    # Held back by `batch`: cancelled at once, never dispatched; the dispatched one is asked.
    held = str(uuid.uuid4())
    submit(held, at, target="web-01,web-02,web-03", batch="1")
    out = cancel_of(held, at + 1)
    assert [t for t, b in out if b["type"] == "cancel"] == ["opsbay/nodes/web-01/jobs"]
    (event,) = on(out, f"opsbay/jobs/{held}", "job")
    got = {x["node"]: x for x in event["job"]["executions"]}
    assert event["total"] == 3 and set(got) == {"web-01", "web-02", "web-03"}
    for n in ("web-02", "web-03"):
        assert (got[n]["state"], got[n]["dispatched_ms"]) == ("cancelled", None)
        assert got[n]["reason"] == "cancelled by ci"
    assert '`"cancelled by <client>"`' in DOC

    # Someone else's job: not_yours, only on the rejected topic; an unknown one: not_found.
    theirs = str(uuid.uuid4())
    submit(theirs, at, kid="default")
    out = cancel_of(theirs, at + 2)
    assert [(t, b["code"]) for t, b in out] == [(rejected, "not_yours")]
    assert out[0][1]["auth"]["kid"] == ci  # signed for the canceller
    out = cancel_of(theirs, at + 3, kid="default")  # the shared secret may cancel any job
    assert [b["type"] for _, b in out] == ["cancel", "job"]
    unknown = str(uuid.uuid4())
    out = cancel_of(unknown, at + 4)
    assert [(t, b["code"]) for t, b in out] == [
        (f"opsbay/jobs/{unknown}", "not_found"), (rejected, "not_found")
    ]  # fmt: skip
    for _, b in out:  # signed for the canceller, so it can tell they are about its cancel
        refusal, auth = decode(json.dumps(b).encode(), bus.c.cfg.keyring)
        assert isinstance(refusal, Rejected) and auth.kid == ci


def test_batch_order_max_failures_and_late_start_by_are_what_the_doc_says(tmp_path: Path) -> None:
    bus = Stepped(tmp_path)
    for n in ("web-01", "web-02", "web-03"):
        bus.node(n, {})
    t = 1_767_225_600_000
    bus.now_ms = t
    job_id = str(uuid.uuid4())
    sub = Submit(
        job_id=job_id, target="web-03,web-02,web-01", command="uptime", timeout_s=60,
        start_by_ms=t + 60_000, batch="1", max_failures="0",
    )  # fmt: skip
    out = bus.send("opsbay/submit", bus.sign(sub, "default"), t)
    said = "dispatches the first *batch* executions in order of node name"
    assert said in " ".join(DOC.split())
    assert [b["node"] for _, b in out if b["type"] == "dispatch"] == ["web-01"]  # not web-03
    out = bus.report(job_id, {"node": "web-01", "finished_ms": t + 5}, state="failed")
    assert not [b for _, b in out if b["type"] == "dispatch"]
    (event,) = on(out, f"opsbay/jobs/{job_id}", "job")
    stopped = [x for x in event["job"]["executions"] if x["node"] != "web-01"]
    template = "not started: more than <max_failures> executions failed"
    assert f'`"{template}"`' in DOC
    assert [(x["state"], x["reason"]) for x in stopped] == [
        ("cancelled", template.replace("<max_failures>", "0"))
    ] * 2
    assert (event["job"]["state"], event["counts"]) == ("failed", {"cancelled": 2, "failed": 1})

    # A start-by deadline already past: accepted, every execution expired at once, nothing sent.
    late = Submit(job_id=str(uuid.uuid4()), target="web-01", command="uptime", timeout_s=60,
                  start_by_ms=t - 1000)  # fmt: skip
    out = bus.send("opsbay/submit", bus.sign(late, "default"), t + 10)
    assert not [b for _, b in out if b["type"] == "dispatch"]
    ((_, event),) = [(x, b) for x, b in out if b["type"] == "job"]
    assert event["counts"] == {"expired": 1}
    said = "a start-by deadline already past when the job arrives makes every execution `expired`"
    assert said in " ".join(DOC.split())


# -- the coordinator and queries, stepped by hand (no broker)
T0 = 1_800_000_000


def coordinator(tmp_path: Path, keyring: signing.Keyring = TEST_KEYRING) -> Coordinator:
    cfg = CoordinatorConfig(topics=Topics("t"), keyring=keyring)
    return Coordinator(cfg, Store(tmp_path / "db.sqlite"), clock=lambda: float(T0))


def test_start_by_limit_is_what_the_coordinator_enforces(tmp_path: Path) -> None:
    (row,) = [r for r in table("limits") if r[0].startswith("`start_by_ms` ahead")]
    limit_s = int(re.search(r"`(\d+)`", row[1])[1])  # type: ignore[index]
    c = coordinator(tmp_path)
    for ahead_ms, code in ((limit_s * 1000, None), (limit_s * 1000 + 1, "invalid")):
        job_id = str(uuid.uuid4())
        sub = Submit(
            job_id=job_id, target="n1", command="true", timeout_s=5,
            start_by_ms=T0 * 1000 + ahead_ms,
        )  # fmt: skip
        c.handle(Inbound("t/submit", encode(sub, TEST_KEYRING, T0)))
        got = [json.loads(o.payload) for o in c.outbox if o.topic == f"t/jobs/{job_id}"]
        assert [m.get("code") for m in got] == [code], got
        if code is None:  # and the dispatch's expiry stays below the MQTT 5 cap
            (dispatch,) = [o for o in c.outbox if o.topic == "t/nodes/n1/jobs"]
            assert dispatch.expiry_s is not None and dispatch.expiry_s <= 2**31 - 1


def test_results_listing_cuts_output_and_result_gives_all(tmp_path: Path) -> None:
    (row,) = [r for r in table("limits") if "`results` reply" in r[0]]
    chars = int(re.search(r"`(\d+)`", row[1])[1])  # type: ignore[index]
    store = Store(tmp_path / "db.sqlite")
    out = "".join(f"line {i}\n" for i in range(100))
    ex = Execution(node="n1", state="succeeded", exit_code=0, stdout=out, stdout_bytes=len(out))
    job = Job(
        job_id=str(uuid.uuid4()), state="succeeded", target="n1", command="x", timeout_s=5,
        start_by_ms=1, submitted_ms=1, submitted_by="shared", executions=[ex],
    )  # fmt: skip
    store.insert_job(job)
    q = {"reply_to": "r", "correlation": "c"}
    (listed,) = queries.answer(Query(query="results", **q), store).data  # type: ignore[arg-type]
    assert listed["executions"][0]["stdout"] == out[-chars:]
    assert listed["executions"][0]["truncated"] is True
    whole = queries.answer(Query(query="result", job_id=job.job_id, **q), store).data  # type: ignore[arg-type]
    assert (whole["executions"][0]["stdout"], whole["executions"][0]["truncated"]) == (out, False)


# -- states
def test_state_tables_match_the_states_module() -> None:
    rows = table("states")
    assert tuple(unquote(r[0]) for r in rows) == states.EXEC_STATES
    assert states.JOB_STATES == states.EXEC_STATES  # "the job state has the same nine values"
    assert len(states.EXEC_STATES) == 9
    assert {unquote(r[0]) for r in rows if r[1] == "yes"} == states.TERMINAL
    assert {r[1] for r in rows} == {"yes", "no"}
    moves = {unquote(r[0]): set(codes(r[1])) for r in table("moves")}
    for a in states.EXEC_STATES:
        for b in states.EXEC_STATES:
            assert states.can_move(a, b) == (b in moves.get(a, set())), (a, b)


def test_severity_order_is_how_the_job_state_aggregates() -> None:
    found = re.search(r"^<!-- severity -->\n(.+)$", DOC, re.M)
    assert found, "no line after <!-- severity -->"
    order = codes(found[1])
    assert set(order) == states.TERMINAL
    for i, better in enumerate(order):
        for worse in order[i + 1 :]:
            assert states.job_state([better, worse]) == worse, (better, worse)
            assert states.job_state([worse, better]) == worse, (better, worse)


# -- b. the shell example, end to end
def shell_snippet() -> str:
    found = [b for lang, _, b in BLOCKS if lang == "bash" and SHELL_MARKER in b.splitlines()]
    assert len(found) == 1, f"expected one ```bash block holding the line {SHELL_MARKER!r}"
    return found[0]


def run_snippet(bus: Bus, **env: str) -> subprocess.CompletedProcess[str]:
    for tool in ("bash", "jq", "openssl", "mosquitto_pub"):
        need(tool)
    return subprocess.run(
        ["bash", "-c", shell_snippet()],
        env=bus.env(MQTT_HOST="127.0.0.1", MQTT_PORT=str(bus.broker.port), **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def watch_everything(bus: Bus) -> Watcher:
    """A plain MQTT watcher of the whole bus, once its subscription is active: a message it
    publishes after subscribing comes back only when the broker has the subscription."""
    w = bus.watch("#")
    probe = f"{bus.prefix}/probe-{uuid.uuid4().hex}"
    w.client.publish(probe, b'{"probe": true}', qos=1)
    w.wait_for(lambda topic, body, retained: topic == probe, "the watcher's own probe")
    return w


def seen(w: Watcher) -> list[tuple[str, dict[str, Any], bool, bytes]]:
    w.find(lambda *_: True)  # drain the queue into w.seen
    return [(t, json.loads(p), r, p) for t, p, r in w.seen if b'"probe"' not in p]


def submitted_nonce(w: Watcher, bus: Bus, job_id: str) -> str:
    (sub,) = w.find(lambda t, b, r: t == f"{bus.prefix}/submit" and b.get("job_id") == job_id)
    return str(sub["auth"]["nonce"])


# Non-ASCII, a non-BMP character, U+007F, quotes and a backslash: all through jq + openssl.
COMMAND = "printf '%s\\n' 'h\u00e9llo \u2603 \U0001f600 from the shell' \"del:\x7f 'q' \\\\back\""
EXPECTED_STDOUT = "h\u00e9llo \u2603 \U0001f600 from the shell\ndel:\x7f 'q' \\back\n"


def settled(events: str) -> Any:
    def check(topic: str, body: dict[str, Any], retained: bool) -> bool:
        state = body.get("job", {}).get("state")
        return topic == events and (body.get("type") == "rejected" or state in states.TERMINAL)

    return check


def snippet_job(bus: Bus, watcher: Watcher, **env: str) -> tuple[str, dict[str, Any]]:
    """Run the shell example with `env`: the job id it printed, and the job's last event once
    the job settled (the coordinator must have accepted the submission)."""
    out = run_snippet(bus, **env)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[-1]
    assert JOB_ID_RE.match(job_id), out.stdout
    events = f"{bus.prefix}/jobs/{job_id}"
    last = watcher.wait_for(settled(events), f"job {job_id} to be rejected or finished", timeout=30)
    assert last["type"] == "job", f"the coordinator refused the shell's submission: {last}"
    return job_id, last


def test_shell_example_submits_a_job_that_the_worker_runs(running: Bus) -> None:
    bus = running
    watcher = watch_everything(bus)
    job_id, _ = snippet_job(
        bus, watcher, OPSBAY_TARGET="n1", OPSBAY_COMMAND=COMMAND, OPSBAY_TIMEOUT_S="30"
    )
    events = f"{bus.prefix}/jobs/{job_id}"
    job = bus.cli_json("result", job_id)
    assert job["state"] == "succeeded", job
    assert (job["target"], job["command"], job["submitted_by"]) == ("n1", COMMAND, "shared")
    assert job["submitted_kid"] == "default"
    (ex,) = job["executions"]
    assert (ex["node"], ex["state"], ex["exit_code"]) == ("n1", "succeeded", 0)
    assert ex["stdout"] == EXPECTED_STDOUT
    assert ex["stdout_bytes"] == len(EXPECTED_STDOUT.encode())
    assert (ex["stderr"], ex["truncated"]) == ("", False)

    # The lifecycle, as any MQTT client sees it: every message verifies with the bus secret.
    keyring = signing.Keyring.shared(bus.secret)
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for topic, body, retained, payload in seen(watcher):
        msg, _ = decode(payload, keyring)
        assert msg.type == body["type"]  # type: ignore[attr-defined]
        if "/nodes/n1/info" not in topic and "/nodes/n1/status" not in topic:
            assert not retained, topic
        by_topic.setdefault(topic, []).append(body)
    p = bus.prefix
    assert [b["type"] for b in by_topic[f"{p}/submit"]] == ["submit"]
    assert [(b["type"], b["node"]) for b in by_topic[f"{p}/nodes/n1/jobs"]] == [("dispatch", "n1")]
    assert [b["state"] for b in by_topic[f"{p}/results/n1/{job_id}"]] == ["running", "succeeded"]
    assert [b["job"]["state"] for b in by_topic[events]] == ["pending", "running", "succeeded"]
    assert f"{p}/rejected" not in by_topic

    # Node info and status are retained: a new subscriber gets them at once.
    late = watch_everything(bus)
    for kind in ("info", "status"):
        late.wait_for(
            lambda t, b, r, kind=kind: t == f"{p}/nodes/n1/{kind}" and r and b["type"] == kind,
            f"the retained {kind} of n1",
        )


def test_shell_example_with_a_glob_labels_and_a_batch(bus: Bus) -> None:
    """`OPSBAY_TARGET` with a glob, `OPSBAY_WHERE` and `OPSBAY_BATCH`: the job reaches exactly the
    nodes the doc's resolution rules name, one at a time, and its events carry what changed."""
    bus.coordinator()
    bus.worker("n1", "--label", "role=web")
    bus.worker("n2", "--label", "role=web")
    bus.worker("n3", "--label", "role=db")
    wait_until(lambda: len(bus.cli_json("nodes", "--state", "online")) == 3, 15, "3 nodes online")
    watcher = watch_everything(bus)
    job_id, _ = snippet_job(
        bus, watcher, OPSBAY_TARGET="n*", OPSBAY_WHERE='{"role": "web"}', OPSBAY_BATCH="1",
        OPSBAY_MAX_FAILURES="0", OPSBAY_COMMAND="echo on $OPSBAY_NODE", OPSBAY_TIMEOUT_S="30",
    )  # fmt: skip
    events = f"{bus.prefix}/jobs/{job_id}"
    job = bus.cli_json("result", job_id)
    assert (job["state"], job["target"], job["where"]) == ("succeeded", "n*", {"role": "web"})
    assert (job["batch"], job["max_failures"]) == ("1", "0")
    assert {x["node"]: x["stdout"] for x in job["executions"]} == {"n1": "on n1\n", "n2": "on n2\n"}
    # One at a time: the second started after the first finished.
    first, second = sorted(job["executions"], key=lambda x: x["started_at"])
    assert first["finished_at"] <= second["dispatched_at"] <= second["started_at"]
    got = [b for t, b, _, _ in seen(watcher) if t == events]
    assert got[0]["total"] == 2 and len(got[0]["job"]["executions"]) == 2  # announced: all
    assert all(len(b["job"]["executions"]) <= 2 for b in got[1:])
    assert got[-1]["counts"] == {"succeeded": 2} and len(got[-1]["job"]["executions"]) == 1


def test_shell_example_with_a_wrong_secret_is_rejected_where_the_doc_says(running: Bus) -> None:
    bus = running
    watcher = watch_everything(bus)
    job_id = str(uuid.uuid4())
    out = run_snippet(
        bus,
        OPSBAY_SECRET="not-the-bus-secret",
        OPSBAY_TARGET="n1",
        OPSBAY_COMMAND="true",
        OPSBAY_JOB_ID=job_id.upper(),  # the snippet lowercases it
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == job_id

    on_job = watcher.wait_for(
        lambda t, b, r: t == f"{bus.prefix}/jobs/{job_id}", "a rejection on the job's topic"
    )
    on_rejected = watcher.wait_for(
        lambda t, b, r: t == f"{bus.prefix}/rejected" and b.get("job_id") == job_id,
        "a rejection on the rejected topic",
    )
    nonce = submitted_nonce(watcher, bus, job_id)
    for body in (on_job, on_rejected):
        assert (body["type"], body["code"], body["job_id"]) == ("rejected", "bad_signature", job_id)
        assert body["nonce"] == nonce  # ... so the submitter knows it is about its message
        assert "auth" not in body and "sig" not in body  # unsigned: no key the submitter shares
    payloads = [p for t, b, _, p in seen(watcher) if b.get("type") == "rejected"]
    assert payloads and all(p == signing.canonical(json.loads(p)) for p in payloads)
    assert bus.cli("result", job_id).returncode == 66  # not_found: a refusal leaves no record


def test_shell_example_resubmissions_are_answered_as_the_doc_says(running: Bus) -> None:
    bus = running
    p = bus.prefix
    first_watcher = watch_everything(bus)
    first = run_snippet(bus, OPSBAY_TARGET="n1", OPSBAY_COMMAND="true")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.split()[-1]
    events = f"{p}/jobs/{job_id}"
    done = first_watcher.wait_for(settled(events), f"job {job_id} to finish", timeout=30)
    assert done["type"] == "job" and done["job"]["state"] == "succeeded", done
    watcher = watch_everything(bus)  # sees only what follows
    same = {"OPSBAY_TARGET": "n1", "OPSBAY_COMMAND": "true", "OPSBAY_JOB_ID": job_id}

    # 1. The same content, another start-by: answered with the job as it stands.
    again = run_snippet(bus, OPSBAY_START_BY_S="900", **same)
    assert again.returncode == 0, again.stderr
    answer = watcher.wait_for(lambda t, b, r: t == events, "the job, as it stands")
    assert answer["type"] == "job" and answer["job"]["job_id"] == job_id

    # 2. A wrong secret for a job that exists: unsigned, and never on that job's topic.
    wrong = run_snippet(bus, OPSBAY_SECRET="not-the-bus-secret", **same)
    assert wrong.returncode == 0, wrong.stderr
    refused = watcher.wait_for(
        lambda t, b, r: t == f"{p}/rejected" and b.get("code") == "bad_signature",
        "the refusal on the rejected topic",
    )
    assert "sig" not in refused and refused["job_id"] == job_id

    # 3. Other content under the same id: job_id_conflict, signed, only on the rejected topic.
    conflict = run_snippet(bus, **{**same, "OPSBAY_COMMAND": "false"})
    assert conflict.returncode == 0, conflict.stderr
    refused = watcher.wait_for(
        lambda t, b, r: t == f"{p}/rejected" and b.get("code") == "job_id_conflict",
        "the conflict on the rejected topic",
    )
    assert refused["job_id"] == job_id and refused["auth"]["kid"] == "default"
    on_job_topic = [b["type"] for t, b, _, _ in seen(watcher) if t == events]
    assert on_job_topic == ["job"], "only the answer to the identical resubmission"


def test_shell_example_with_a_client_key(bus: Bus, tmp_path: Path) -> None:
    """The note under the snippet: OPSBAY_KID and a client key's secret instead of the shared
    one; and the key rules of the doc, as a watcher holding every key sees them."""
    entries = {
        ("client", "ci"): (f"ci-{uuid.uuid4().hex[:8]}", secrets.token_hex(32)),
        ("node", "n1"): (f"n1-{uuid.uuid4().hex[:8]}", secrets.token_hex(32)),
    }
    files = {}
    for (kind, name), (kid, secret) in entries.items():
        files[name] = tmp_path / f"{name}.toml"
        files[name].write_text(keys.key_entry(kid, kind, name, secret))
        files[name].chmod(0o600)  # opsbay refuses key files others can read
    everything = "\n".join(keys.key_entry(k, kind, n, s) for (kind, n), (k, s) in entries.items())
    (tmp_path / "coordinator.toml").write_text(everything)
    (tmp_path / "coordinator.toml").chmod(0o600)
    no_shared = {"OPSBAY_SECRET": ""}
    bus.coordinator(OPSBAY_KEY_FILE=str(tmp_path / "coordinator.toml"), **no_shared)
    bus.worker("n1", OPSBAY_KEY_FILE=str(files["n1"]), **no_shared)
    watcher = watch_everything(bus)

    client_kid, client_secret = entries[("client", "ci")]
    node_kid = entries[("node", "n1")][0]
    _, last = snippet_job(
        bus, watcher, OPSBAY_KID=client_kid, OPSBAY_SECRET=client_secret, OPSBAY_TARGET="n1",
        OPSBAY_COMMAND="echo with a client key",
    )  # fmt: skip
    assert last["job"]["state"] == "succeeded", last
    assert (last["job"]["submitted_by"], last["job"]["submitted_kid"]) == ("ci", client_kid)
    assert last["job"]["executions"][0]["stdout"] == "with a client key\n"

    keyring = keys.keyring(keys.load(tmp_path / "coordinator.toml"), None, client_kid)
    kids: dict[str, set[str]] = {}
    for _, body, _, payload in seen(watcher):
        _, auth = decode(payload, keyring)
        kids.setdefault(body["type"], set()).add(auth.kid)
    # Live output (QoS 0, so not relied on here) is signed like the node's results.
    assert kids.pop("output", {node_kid}) == {node_kid}
    assert kids == {
        "submit": {client_kid},  # the client's key ...
        "job": {client_kid},  # ... and the submitter's key for its events
        "dispatch": {node_kid},  # the node's key, both ways
        "result": {node_kid},
        "info": {node_kid},
        "status": {node_kid},
    }, kids


def test_a_bad_json_refusal_names_the_job_and_nonce_as_the_rejected_table_says(
    tmp_path: Path,
) -> None:
    (job_row,) = [r for r in table("fields: rejected") if r[0] == "`job_id`"]
    assert "Read leniently when the payload is refused as `bad_json`" in job_row[3]
    c = coordinator(tmp_path)
    job_id, nonce = str(uuid.uuid4()), "ab" * 16
    body = {"v": 1, "type": "submit", "job_id": job_id, "target": "n1", "command": "true",
            "timeout_s": 1.5, "start_by_ms": 1, "sig": "00" * 32,
            "auth": {"kid": "default", "nonce": nonce, "ts": T0}}  # fmt: skip
    c.handle(Inbound("t/submit", json.dumps(body).encode()))
    refusals = [json.loads(o.payload) for o in c.outbox if o.topic == f"t/jobs/{job_id}"]
    assert [(r["code"], r["job_id"], r["nonce"]) for r in refusals] == [("bad_json", job_id, nonce)]


def test_the_same_bytes_of_an_unstored_refusal_get_the_same_reason_as_the_document_says(
    tmp_path: Path,
) -> None:
    (row,) = [r for r in table_rows_of("Freshness and replay") if r[0] == "`submit`"]
    assert "the same bytes sent again get the same reason again" in row[3]
    c = coordinator(tmp_path)
    sub = Submit(job_id=str(uuid.uuid4()), target="nothing-*", command="true", timeout_s=60,
                 start_by_ms=(T0 + 60) * 1000)  # fmt: skip
    payload = encode(sub, TEST_KEYRING, T0)
    for _ in range(2):
        c.handle(Inbound("t/submit", payload))
    codes = [json.loads(o.payload)["code"] for o in c.outbox if o.topic == f"t/jobs/{sub.job_id}"]
    assert codes == ["no_match", "no_match"]


def table_rows_of(section: str) -> list[list[str]]:
    """The rows of the first Markdown table under the heading `## {section}`."""
    found = re.search(rf"^## {re.escape(section)}\n(?:.*\n)*?((?:\|.*\n)+)", DOC, re.M)
    assert found, f"no table under '## {section}'"
    rows = found[1].splitlines()[2:]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
