"""The one exception root, and the errors a person may need to act on."""

from __future__ import annotations


class OpsbayError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(OpsbayError):
    """A setting is missing or invalid; the message names the setting."""


class BrokerError(OpsbayError):
    """The broker could not be reached or refused us."""


class Refused(OpsbayError):
    """A message was refused. `code` is a stable reason code, `str()` the text for a person."""

    def __init__(self, code: str, text: str, kid: str | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.kid = kid  # the key that signed the refused message, when it verified

    def __str__(self) -> str:
        return f"{self.code}: {self.text}"
