"""The one exception root, and the errors a person may need to act on."""

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
