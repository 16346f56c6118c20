"""topics: node names, building and parsing every topic kind, exact matching."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from opsbay_mqtt.errors import Refused
from opsbay_mqtt.topics import Topics, new_job_id, validate_job_id, validate_node

JOB = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"


@pytest.mark.parametrize(
    "name",
    ["web", "web-01", "a.b_c", "a" * 63, "W", "0", "9node", "A-Z.a_z-0.9", "x-" * 31 + "y"],
)
def test_valid_node_names(name: str) -> None:
    assert validate_node(name) == name
    assert Topics().parse(Topics().node_jobs(name)) == ("node_jobs", {"node": name})


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b",
        "+",
        "#",
        "web+",
        "web#",
        "we b",
        " web",
        "web ",
        "a" * 64,
        "-web",
        ".web",
        "_web",
        "w\u00e9b",
        "\u0561bc",  # Armenian small letter ayb
        "\uff57eb",  # fullwidth w
        "web\n",
        "web\nx",
        "web\t",
        "web\x00",
        "web/",
        "/",
    ],
    ids=repr,
)
def test_invalid_node_names(name: str) -> None:
    with pytest.raises(Refused) as e:
        validate_node(name)
    assert e.value.code == "bad_node_name"
    with pytest.raises(Refused):
        Topics().node_jobs(name)


def test_node_name_must_be_a_string() -> None:
    with pytest.raises(Refused) as e:
        validate_node(None)  # type: ignore[arg-type]
    assert e.value.code == "bad_node_name"


@pytest.mark.parametrize(
    "job_id",
    ["", "not-a-uuid", JOB.upper(), JOB[:-1], JOB + "0", JOB.replace("-", ""), JOB + "\n", "+"],
    ids=repr,
)
def test_invalid_job_ids(job_id: str) -> None:
    with pytest.raises(Refused) as e:
        validate_job_id(job_id)
    assert e.value.code == "bad_job_id"


def test_new_job_id_is_valid_and_unique() -> None:
    a, b = new_job_id(), new_job_id()
    assert validate_job_id(a) == a
    assert a != b


PREFIXES = ["opsbay", "t0123", "a/b/c", "site-1/ops.bay_x"]

BUILT: list[tuple[Callable[[Topics], str], str, dict[str, str], str]] = [
    (lambda t: t.submit, "submit", {}, "submit"),
    (lambda t: t.rpc_request, "rpc_request", {}, "rpc/request"),
    (lambda t: t.rejected, "rejected", {}, "rejected"),
    (lambda t: t.rpc_reply("r-1_x"), "rpc_reply", {"reply_id": "r-1_x"}, "rpc/reply/r-1_x"),
    (lambda t: t.node_jobs("web-01"), "node_jobs", {"node": "web-01"}, "nodes/web-01/jobs"),
    (lambda t: t.node_info("web-01"), "node_info", {"node": "web-01"}, "nodes/web-01/info"),
    (lambda t: t.node_status("web"), "node_status", {"node": "web"}, "nodes/web/status"),
    (
        lambda t: t.result("a.b_c", JOB),
        "result",
        {"node": "a.b_c", "job_id": JOB},
        f"results/a.b_c/{JOB}",
    ),
    (
        lambda t: t.output("n1", JOB),
        "output",
        {"node": "n1", "job_id": JOB},
        f"output/n1/{JOB}",
    ),
    (lambda t: t.job_events(JOB), "job_events", {"job_id": JOB}, f"jobs/{JOB}"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("build", "kind", "fields", "suffix"), BUILT, ids=[b[1] for b in BUILT])
def test_build_then_parse(
    prefix: str,
    build: Callable[[Topics], str],
    kind: str,
    fields: dict[str, str],
    suffix: str,
) -> None:
    topics = Topics(prefix)
    topic = build(topics)
    assert topic == f"{prefix}/{suffix}"
    assert topics.parse(topic) == (kind, fields)


def test_default_prefix() -> None:
    assert Topics().submit == "opsbay/submit"


def test_subscriptions() -> None:
    t = Topics("a/b")
    assert t.all_results == "a/b/results/+/+"
    assert t.all_node_info == "a/b/nodes/+/info"
    assert t.all_node_status == "a/b/nodes/+/status"


def test_node_topics_match_exactly() -> None:
    t = Topics()
    assert t.node_jobs("web") != t.node_jobs("web-01")
    assert not t.node_jobs("web-01").startswith(t.node_jobs("web"))
    assert t.parse(t.node_jobs("web-01")) == ("node_jobs", {"node": "web-01"})
    assert t.parse(t.node_jobs("web")) == ("node_jobs", {"node": "web"})
    assert t.parse(t.result("web-01", JOB))[1]["node"] == "web-01"


@pytest.mark.parametrize(
    ("prefix", "topic", "code"),
    [
        ("opsbay", "other/submit", "bad_topic"),
        ("opsbay", "opsbay2/submit", "bad_topic"),
        ("opsbay", "opsbay", "bad_topic"),
        ("opsbay", "opsbay/", "bad_topic"),
        ("opsbay", "/opsbay/submit", "bad_topic"),
        ("opsbay", "OPSBAY/submit", "bad_topic"),
        ("opsbay", "opsbay/submit/x", "bad_topic"),
        ("opsbay", "opsbay/unknown", "bad_topic"),
        ("opsbay", "opsbay/rpc", "bad_topic"),
        ("opsbay", "opsbay/rpc/reply", "bad_topic"),
        ("opsbay", "opsbay/rpc/reply/bad id", "bad_topic"),
        ("opsbay", "opsbay/rpc/reply/+", "bad_topic"),
        ("opsbay", "opsbay/nodes/web", "bad_topic"),
        ("opsbay", "opsbay/nodes/web/other", "bad_topic"),
        ("opsbay", "opsbay/nodes/web/jobs/x", "bad_topic"),
        ("opsbay", "opsbay/nodes/+/jobs", "bad_node_name"),
        ("opsbay", "opsbay/nodes/#/info", "bad_node_name"),
        ("opsbay", "opsbay/nodes//status", "bad_node_name"),
        ("opsbay", f"opsbay/results/+/{JOB}", "bad_node_name"),
        ("opsbay", "opsbay/results/web/+", "bad_job_id"),
        ("opsbay", "opsbay/results/web", "bad_topic"),
        ("opsbay", f"opsbay/output/web/{JOB.upper()}", "bad_job_id"),
        ("opsbay", "opsbay/jobs/not-a-uuid", "bad_job_id"),
        ("opsbay", f"opsbay/jobs/{JOB}/x", "bad_topic"),
        ("a/b", "a/submit", "bad_topic"),
        ("a", "a/b/submit", "bad_topic"),
        ("a/b", "a/bc/submit", "bad_topic"),
    ],
)
def test_parse_refuses_foreign_topics(prefix: str, topic: str, code: str) -> None:
    with pytest.raises(Refused) as e:
        Topics(prefix).parse(topic)
    assert e.value.code == code


@pytest.mark.parametrize(
    "prefix", ["", "/", "/a", "a/", "a//b", "a/+", "#", "a b", "a/b#", "\u00e9", "opsbay\n"]
)
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(Refused) as e:
        Topics(prefix)
    assert e.value.code == "bad_prefix"


@pytest.mark.parametrize("reply_id", ["", "a/b", "+", "#", "a b", "a.b", "r" * 65])
def test_bad_reply_id(reply_id: str) -> None:
    with pytest.raises(Refused) as e:
        Topics().rpc_reply(reply_id)
    assert e.value.code == "bad_reply_id"
