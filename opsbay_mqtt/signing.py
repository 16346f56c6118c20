"""Canonical JSON and HMAC-SHA256 signing: pure functions over bytes, dicts and `now`.

Wire form: a JSON object whose `auth` member names the key id, a timestamp and a nonce, and
whose `sig` member is the lowercase hex HMAC-SHA256 of the canonical form of the object
without `sig`. Canonical form: keys sorted by code point, no insignificant whitespace, UTF-8,
non-ASCII characters unescaped, U+007F escaped as \\u007f (what `jq -cS` prints), no floats.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from opsbay_mqtt.errors import Refused

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
DEFAULT_WINDOW_S = 300
NONCE_RE = re.compile(r"^[0-9a-f]{16,64}$")
SIG_RE = re.compile(r"^[0-9a-f]{64}$")
KID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def random_hex(n_bytes: int) -> str:
    """`secrets.token_hex`, which is this, without importing `secrets` (and with it `random`)
    on every CLI call."""
    return os.urandom(n_bytes).hex()


def canonical(obj: Mapping[str, Any]) -> bytes:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("\x7f", "\\u007f").encode("utf-8")


def mac(secret: bytes, obj: Mapping[str, Any]) -> str:
    return hmac.new(secret, canonical(obj), hashlib.sha256).hexdigest()


class Identity(NamedTuple):
    """Who holds a key: a client or a node, by name."""

    kind: str  # "client" or "node"
    name: str


@dataclass(frozen=True)
class Keyring:
    """Secrets by key id, the key id this party signs with, and whose each key is.

    A key id missing from `identities` is a shared key: it speaks for anyone (the simple mode).
    """

    keys: Mapping[str, bytes] = field(repr=False)
    signing_kid: str
    identities: Mapping[str, Identity] = field(default_factory=dict)

    def identity(self, kid: str) -> Identity | None:
        return self.identities.get(kid)

    def kids_of(self, who: Identity) -> list[str]:
        """Key ids of one identity, in the order they were listed."""
        return [kid for kid, i in self.identities.items() if i == who]

    @property
    def shared_kid(self) -> str | None:
        return next((kid for kid in self.keys if kid not in self.identities), None)

    @classmethod
    def shared(cls, secret: str | bytes, kid: str = "default") -> Keyring:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw:
            raise Refused("no_secret", "the shared secret is empty")
        return cls(keys={kid: raw}, signing_kid=kid)

    def secret_for(self, kid: str) -> bytes:
        try:
            return self.keys[kid]
        except KeyError:
            raise Refused("unknown_key", f"unknown key id {kid!r}") from None


def sign(
    body: Mapping[str, Any],
    keyring: Keyring,
    now: int,
    nonce: str | None = None,
    kid: str | None = None,
) -> bytes:
    """Return the wire bytes of `body` with `auth` and `sig` added, signed with `kid` (default:
    the keyring's own signing key)."""
    kid = kid or keyring.signing_kid
    msg = dict(body)
    msg["auth"] = {"kid": kid, "ts": int(now), "nonce": nonce or random_hex(16)}
    msg["sig"] = mac(keyring.secret_for(kid), msg)
    return canonical(msg)


def _no_floats(text: str) -> Any:
    raise ValueError(f"floats are not allowed in a signed message ({text})")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse(payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """Decode wire bytes to a JSON object, refusing anything that is not one."""
    if len(payload) > max_bytes:
        raise Refused("too_large", f"message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        text = payload.decode("utf-8")
        obj = json.loads(
            text,
            parse_float=_no_floats,
            parse_constant=_no_floats,
            object_pairs_hook=_no_duplicates,
        )
    except UnicodeDecodeError as e:
        raise Refused("bad_json", f"message is not UTF-8: {e.reason}") from e
    except RecursionError as e:
        raise Refused("bad_json", "message is nested too deeply") from e
    except ValueError as e:
        raise Refused("bad_json", f"message is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise Refused("bad_json", "message is not a JSON object")
    _check_depth(obj)
    return obj


def _check_depth(obj: Any) -> None:
    """Refuse messages nested deeper than MAX_DEPTH (iteratively: no recursion to exhaust)."""
    # Only containers are stacked: a member or element is one level below its container, so a
    # non-empty container at the deepest level allowed is already one too deep.
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        members = item.values() if isinstance(item, dict) else item
        if depth >= MAX_DEPTH and members:
            raise Refused("bad_json", f"message is nested deeper than {MAX_DEPTH} levels")
        stack.extend((v, depth + 1) for v in members if isinstance(v, dict | list))


class Auth(NamedTuple):
    kid: str
    ts: int
    nonce: str
    identity: Identity | None = None  # None: a shared key


def verify(obj: Mapping[str, Any], keyring: Keyring) -> Auth:
    """Check the signature of a parsed message; return its auth block."""
    auth = obj.get("auth")
    sig = obj.get("sig")
    if not isinstance(auth, dict) or sig is None:
        raise Refused("unsigned", "message has no auth block or no sig")
    kid, ts, nonce = auth.get("kid"), auth.get("ts"), auth.get("nonce")
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
        raise Refused("bad_auth", "auth.kid must be a key id of 1-64 of A-Z a-z 0-9 . _ -")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 2**40:
        raise Refused("bad_auth", "auth.ts must be an integer number of seconds since the epoch")
    if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
        raise Refused("bad_auth", "auth.nonce must be 16-64 lowercase hex characters")
    if set(auth) != {"kid", "ts", "nonce"}:
        raise Refused("bad_auth", "auth must hold exactly kid, ts and nonce")
    if not isinstance(sig, str) or not SIG_RE.fullmatch(sig):
        raise Refused("bad_signature", "sig must be 64 lowercase hex characters")
    secret = keyring.secret_for(kid)
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    try:
        expected = mac(secret, unsigned)
    except (UnicodeEncodeError, RecursionError, ValueError) as e:  # e.g. a lone surrogate
        raise Refused("bad_json", f"message has no canonical form: {e}") from e
    if not hmac.compare_digest(expected, sig):
        raise Refused("bad_signature", f"signature does not match key {kid!r}")
    return Auth(kid=kid, ts=ts, nonce=nonce, identity=keyring.identity(kid))


def check_fresh(auth: Auth, now: int, window_s: int = DEFAULT_WINDOW_S) -> None:
    skew = now - auth.ts
    if abs(skew) > window_s:
        direction = "old" if skew > 0 else "in the future"
        raise Refused(
            "stale",
            f"timestamp is {abs(skew)} s {direction}; the window is {window_s} s "
            "(check the clocks)",
        )
