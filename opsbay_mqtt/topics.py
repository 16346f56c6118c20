"""The only place a topic string is built or parsed."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from opsbay_mqtt.errors import Refused

# Node names: what a host name may hold, plus '_'. No '/', '+', '#', spaces or empty names,
# so a node name is always exactly one topic level and can never act as a wildcard.
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
REPLY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_node(name: str) -> str:
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        raise Refused(
            "bad_node_name",
            f"invalid node name {name!r}: use 1-63 of A-Z a-z 0-9 . _ - (starting with a letter "
            "or digit)",
        )
    return name


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise Refused("bad_job_id", f"invalid job id {job_id!r}: expected a lowercase UUID")
    return job_id


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Topics:
    """Every topic of one bus, under one prefix (default `opsbay`)."""

    prefix: str = "opsbay"

    def __post_init__(self) -> None:
        if not PREFIX_RE.fullmatch(self.prefix):
            raise Refused("bad_prefix", f"invalid topic prefix {self.prefix!r}")

    # -- built
    @property
    def submit(self) -> str:
        return f"{self.prefix}/submit"

    @property
    def rpc_request(self) -> str:
        return f"{self.prefix}/rpc/request"

    @property
    def rejected(self) -> str:
        return f"{self.prefix}/rejected"

    def rpc_reply(self, reply_id: str) -> str:
        if not REPLY_ID_RE.fullmatch(reply_id):
            raise Refused("bad_reply_id", f"invalid reply id {reply_id!r}")
        return f"{self.prefix}/rpc/reply/{reply_id}"

    def node_jobs(self, node: str) -> str:
        return f"{self.prefix}/nodes/{validate_node(node)}/jobs"

    def node_info(self, node: str) -> str:
        return f"{self.prefix}/nodes/{validate_node(node)}/info"

    def node_status(self, node: str) -> str:
        return f"{self.prefix}/nodes/{validate_node(node)}/status"

    def result(self, node: str, job_id: str) -> str:
        return f"{self.prefix}/results/{validate_node(node)}/{validate_job_id(job_id)}"

    def output(self, node: str, job_id: str) -> str:
        return f"{self.prefix}/output/{validate_node(node)}/{validate_job_id(job_id)}"

    def job_events(self, job_id: str) -> str:
        return f"{self.prefix}/jobs/{validate_job_id(job_id)}"

    # -- subscriptions
    def job_output(self, job_id: str) -> str:
        """Live output of a job from every node."""
        return f"{self.prefix}/output/+/{validate_job_id(job_id)}"

    @property
    def all_results(self) -> str:
        return f"{self.prefix}/results/+/+"

    @property
    def all_node_info(self) -> str:
        return f"{self.prefix}/nodes/+/info"

    @property
    def all_node_status(self) -> str:
        return f"{self.prefix}/nodes/+/status"

    # -- parsed
    def parse(self, topic: str) -> tuple[str, dict[str, str]]:
        """Return (kind, fields) for a topic of this bus; raise Refused for anything else."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise Refused("bad_topic", f"topic {topic!r} is not under {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        match parts:
            case ["submit"]:
                return "submit", {}
            case ["rpc", "request"]:
                return "rpc_request", {}
            case ["rpc", "reply", reply_id] if REPLY_ID_RE.fullmatch(reply_id):
                return "rpc_reply", {"reply_id": reply_id}
            case ["nodes", node, ("jobs" | "info" | "status") as kind]:
                return f"node_{kind}", {"node": validate_node(node)}
            case ["results", node, job_id]:
                return "result", {"node": validate_node(node), "job_id": validate_job_id(job_id)}
            case ["output", node, job_id]:
                return "output", {"node": validate_node(node), "job_id": validate_job_id(job_id)}
            case ["jobs", job_id]:
                return "job_events", {"job_id": validate_job_id(job_id)}
            case ["rejected"]:
                return "rejected", {}
        raise Refused("bad_topic", f"unknown topic {topic!r}")
