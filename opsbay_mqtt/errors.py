"""The one exception root, the errors a person may need to act on, and the exit code each one
means (`exit_for`: the one mapping, for every command, the Cronicle plugin and the agent)."""

from __future__ import annotations


class OpsbayError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(OpsbayError):
    """A setting is missing or invalid; the message names the setting."""


class BrokerError(OpsbayError):
    """The broker could not be reached or refused us."""


class BrokerRefused(BrokerError):
    """The broker answered a publish or subscribe with a failure reason code (MQTT 5 PUBACK or
    SUBACK; MQTT 3.1.1 SUBACK 0x80): usually its ACL does not let this login use `topic`."""

    def __init__(self, action: str, topic: str, reason: str, code: int, login: str | None) -> None:
        who = f"login {login!r}" if login else "this (anonymous) login"
        super().__init__(
            f"the broker refused to let {who} {action} {topic}: {reason} (reason code {code}); "
            "check the broker's ACL for this login"
        )
        self.action, self.topic, self.reason, self.code = action, topic, reason, code


class Refused(OpsbayError):
    """A message was refused. `code` is a stable reason code, `str()` the text for a person."""

    def __init__(self, code: str, text: str, kid: str | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.kid = kid  # the key that signed the refused message, when it verified

    def __str__(self) -> str:
        return f"{self.code}: {self.text}"


class StoreUnavailable(OpsbayError):
    """The coordinator's record (PostgreSQL) could not be reached, or the connection to it was
    lost: nothing of the open batch was committed (its messages are not acknowledged, so the
    broker delivers them again). Exit 69: the supervisor restarts the coordinator."""


class UsageError(ConfigError):
    """An invalid argument or option value as typed (exit 2, not 78). A ConfigError still, for
    the callers that read settings and arguments alike (the Cronicle plugin's params)."""

    def __init__(self, option: str, text: str) -> None:
        super().__init__(f"{option}: {text}")
        self.option = option


class WaitTimeout(OpsbayError):
    """The caller's wait ran out; the job goes on."""


class NotAcknowledged(OpsbayError):
    """No coordinator acknowledged a submission or cancel in time."""


class QueryFailed(OpsbayError):
    """The coordinator answered a query with an error (`code`: not_found, ...)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code


# Exit codes of `opsbay submit --wait` and `opsbay result` (documented in the README).
# A job that ran to completion exits with the command's own code; these cover the rest.
EXIT_USAGE = 2
EXIT_EXPIRED = 68  # not started before its start-by deadline (node offline or unknown)
EXIT_UNAVAILABLE = 69  # broker unreachable, or the coordinator did not answer
EXIT_LOST = 70  # the worker died or restarted during the run
EXIT_NOT_FOUND = 66  # `opsbay result`: no such job
EXIT_WAIT_GAVE_UP = 75  # the caller's wait ran out (or no acknowledgement yet); the job goes on
EXIT_REJECTED = 77  # refused by the coordinator (signature, freshness, replay, schema, policy)
EXIT_CONFIG = 78  # a setting is missing or invalid
EXIT_CANCELLED = 80  # cancelled before it finished
EXIT_TIMED_OUT = 124  # the run timeout hit; the process group was killed (as timeout(1))


def exit_for(e: BaseException) -> tuple[int, str] | None:
    """The exit code and message for one of this package's errors (None: not one of ours)."""
    if isinstance(e, UsageError):  # what was typed (a ConfigError too: checked first)
        return EXIT_USAGE, str(e)
    if isinstance(e, ConfigError):
        return EXIT_CONFIG, str(e)
    if isinstance(e, BrokerRefused):  # the broker's ACL: a permission, as for a refusal
        return EXIT_REJECTED, str(e)
    if isinstance(e, BrokerError | NotAcknowledged | StoreUnavailable):
        return EXIT_UNAVAILABLE, str(e)
    if isinstance(e, WaitTimeout):
        return EXIT_WAIT_GAVE_UP, f"{e}; the job goes on (see `opsbay result`)"
    if isinstance(e, QueryFailed):
        if e.code == "schedule_exists":  # a name already taken: what was typed
            return EXIT_USAGE, str(e)
        return EXIT_NOT_FOUND if e.code == "not_found" else EXIT_REJECTED, str(e)
    if isinstance(e, Refused):
        return EXIT_USAGE if e.code.startswith("bad_") else EXIT_REJECTED, e.text
    return None
