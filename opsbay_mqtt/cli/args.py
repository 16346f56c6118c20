"""What was typed on the command line, checked before anything connects (pure, plain `re`).

Every check here returns the value (parsed) or raises `UsageError`, whose message names the
option and says in words what is allowed: the CLI exits 2 for it. The limits are the protocol's
(docs/protocol.md, "Limits" and "Names and ids"); `protocol` holds them as pydantic models, which
`opsbay submit` must not import, so the few that matter here are repeated, and
tests/test_cli_input.py checks that they agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from opsbay_mqtt.errors import UsageError as UsageError
from opsbay_mqtt.protocol import LIMIT_PATTERN
from opsbay_mqtt.topics import JOB_ID_RE, NODE_NAME_RE

MAX_TIMEOUT_S = 7 * 86400  # protocol.MAX_TIMEOUT_S
MAX_DURATION_S = 3650 * 86400  # any other duration: ten years is already a mistake
MAX_COMMAND_BYTES = 64 * 1024  # protocol.MAX_COMMAND_BYTES
MAX_TARGET_ITEMS = 1000  # protocol.MAX_TARGET_ITEMS
TARGET_ITEM_RE = re.compile(r"[A-Za-z0-9*?][A-Za-z0-9._*?-]{0,62}")  # protocol.TARGET_ITEM_RE
MAX_LABELS = 32
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9._/-]{1,64}")
MAX_LABEL_VALUE = 256

_DURATION_RE = re.compile(r"([0-9]{1,12})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_JOB_ID_EXAMPLE = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"
_NODE_RULE = "1-63 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"


def _days(seconds: int) -> str:
    return f"{seconds // 86400}d"


def utf8(text: str, option: str) -> str:
    """`text` if it is valid UTF-8: bytes that are not arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(
            option, f"not valid UTF-8 (an undecodable byte at character {e.start + 1})"
        ) from None
    return text


def parse_duration(text: str, option: str, max_s: int = MAX_DURATION_S) -> int:
    """'90', '90s', '15m', '2h', '1d' -> seconds, from 1 to `max_s`."""
    m = _DURATION_RE.fullmatch(text.strip().lower())
    if m is None or int(m.group(1)) == 0:
        raise UsageError(
            option,
            f"{text!r} is not a duration: a whole number of seconds (30) or a number followed "
            "by s, m, h or d (90s, 15m, 2h, 1d), at least 1 s",
        )
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > max_s:
        raise UsageError(option, f"{text!r} is too long: at most {_days(max_s)} ({max_s} s)")
    return seconds


def parse_timeout(text: str, option: str = "--timeout") -> int:
    """The run timeout: 1 s to 7 days, the protocol's limit."""
    return parse_duration(text, option, MAX_TIMEOUT_S)


def parse_labels(items: Iterable[str], option: str) -> dict[str, str]:
    """KEY=VALUE items (key and value stripped) -> labels, within the protocol's limits."""
    labels: dict[str, str] = {}
    for item in items:
        utf8(item, option)
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not LABEL_KEY_RE.fullmatch(key):
            raise UsageError(
                option,
                f"{item!r} is not KEY=VALUE with a key of 1-64 of A-Z a-z 0-9 . _ / -",
            )
        if len(value) > MAX_LABEL_VALUE:
            raise UsageError(
                option, f"the value of {key!r} is {len(value)} characters: at most 256"
            )
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise UsageError(option, f"{len(labels)} labels: at most {MAX_LABELS}")
    return labels


def check_node(name: str, option: str) -> str:
    if not NODE_NAME_RE.fullmatch(name):
        shown = "empty" if name == "" else f"invalid node name {name!r}"
        raise UsageError(option, f"{shown}: a node name is {_NODE_RULE}")
    return name


def check_target(target: str, option: str = "--target") -> str:
    """A node, a comma-separated list, or globs (`*`, `?`)."""
    items = target.split(",")
    if len(items) > MAX_TARGET_ITEMS:
        raise UsageError(option, f"{len(items)} names: at most {MAX_TARGET_ITEMS}")
    for item in items:
        if not TARGET_ITEM_RE.fullmatch(item):
            what = "an empty name" if item == "" else f"{item!r} is not a node name or a glob"
            raise UsageError(
                option,
                f"{what}: give node names or globs, comma-separated, without spaces; each is "
                "1-63 of A-Z a-z 0-9 . _ - * ? (starting with a letter, a digit, * or ?)",
            )
    return target


def check_job_id(job_id: str, option: str = "JOB_ID") -> str:
    if not JOB_ID_RE.fullmatch(job_id):
        raise UsageError(
            option,
            f"{job_id!r} is not a job id: a lowercase UUID as `opsbay submit` prints it "
            f"({_JOB_ID_EXAMPLE})",
        )
    return job_id


def check_limit(value: str, option: str, at_least_one: bool) -> str:
    """A rollout limit (--batch, --max-failures): a count or a share."""
    if not re.fullmatch(LIMIT_PATTERN, value):
        raise UsageError(
            option,
            f"{value!r} is not a count of nodes (10) or a share of them (25%): 1-6 digits "
            "without a leading zero, optionally followed by %",
        )
    if at_least_one and value in ("0", "0%"):
        raise UsageError(option, f"{value!r}: at least 1 (or 1%)")
    return value


def check_command(command: str, option: str = "--command") -> str:
    """A shell command as the protocol takes it: 1 to 65536 bytes of UTF-8, no NUL."""
    utf8(command, option)
    if not command:
        raise UsageError(option, "empty: give the shell command to run (or @NAME)")
    size = len(command.encode("utf-8"))
    if size > MAX_COMMAND_BYTES:
        raise UsageError(option, f"{size} bytes: at most {MAX_COMMAND_BYTES} (64 KiB) of UTF-8")
    if "\x00" in command:
        raise UsageError(option, "holds a NUL character, which no shell command can hold")
    return command


def decode_command(data: bytes, option: str) -> str:
    """A command read from a file or stdin: UTF-8, checked as `check_command` does."""
    if len(data) > MAX_COMMAND_BYTES:
        raise UsageError(
            option, f"more than {MAX_COMMAND_BYTES} bytes: at most {MAX_COMMAND_BYTES} (64 KiB)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(option, f"not valid UTF-8 (at byte {e.start})") from None
    return check_command(text, option)
