"""Key files: per-identity keys with key ids, and what each client may do.

A key file is TOML. Each `[[keys]]` entry is one key of one identity (a client or a node);
an identity may have several (that is how keys rotate). The coordinator's file lists every
key, and may say what each client may do under `[clients.<name>]`; a worker's file holds only
its node's keys; a client's file only that client's keys. A party signs with the last of its
keys listed and accepts all of them.

    [[keys]]
    id = "ci-20261127-3f2a"
    client = "ci"                  # or: node = "web-01"
    secret = "64 hex characters"

    [clients.ci]
    targets = ["web-*", "db-01", "role=web"]
    commands = ["deploy-app *", "uptime"]
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsbay_mqtt.errors import ConfigError, Refused
from opsbay_mqtt.signing import KID_RE, Identity, Keyring, random_hex
from opsbay_mqtt.topics import NODE_NAME_RE

if TYPE_CHECKING:  # policies are read only from key files that have them
    from opsbay_mqtt.policy import ClientPolicy

SECRET_RE = re.compile(r"[0-9a-f]{64}")
CLIENT_NAME_RE = NODE_NAME_RE


@dataclass(frozen=True)
class KeyFile:
    keys: list[tuple[str, Identity, bytes]]  # (key id, identity, secret), in file order
    clients: dict[str, ClientPolicy] = field(default_factory=dict)

    def signing_kid(self, kind: str, name: str | None = None) -> str | None:
        """The last listed key of a client (any, or `name`) or of node `name`."""
        mine = [k for k, who, _ in self.keys if who.kind == kind and name in (None, who.name)]
        return mine[-1] if mine else None


def keyring(file: KeyFile | None, shared: bytes | None, signing_kid: str | None) -> Keyring:
    """One keyring of a key file's keys and the shared secret, signing with `signing_kid` (the
    shared key when None)."""
    secrets_by_kid: dict[str, bytes] = {}
    identities: dict[str, Identity] = {}
    for kid, who, secret in file.keys if file else []:
        secrets_by_kid[kid] = secret
        identities[kid] = who
    if shared is not None:
        secrets_by_kid["default"] = shared
    signing = signing_kid or ("default" if shared is not None else None)
    if signing is None:
        raise ConfigError("no key to sign with: set OPSBAY_SECRET or OPSBAY_KEY_FILE")
    return Keyring(keys=secrets_by_kid, signing_kid=signing, identities=identities)


def _fail(path: Path, text: str) -> ConfigError:
    return ConfigError(f"--key-file / OPSBAY_KEY_FILE: {path}: {text}")


def load(path: Path) -> KeyFile:
    import tomllib  # here: every CLI call imports this module, few read a key file

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"not valid TOML: {e}") from e
    unknown = set(data) - {"keys", "clients"}
    if unknown:
        raise _fail(path, f"unknown section(s) {', '.join(sorted(unknown))}")
    keys: list[tuple[str, Identity, bytes]] = []
    seen: set[str] = set()
    for i, entry in enumerate(data.get("keys", [])):
        keys.append(_key(path, i, entry, seen))
    clients = {}
    for name, spec in data.get("clients", {}).items():
        clients[name] = _client_policy(path, name, spec)
    return KeyFile(keys=keys, clients=clients)


def _key(path: Path, i: int, entry: Any, seen: set[str]) -> tuple[str, Identity, bytes]:
    where = f"keys entry {i + 1}"
    if not isinstance(entry, dict) or set(entry) - {"id", "client", "node", "secret"}:
        raise _fail(path, f"{where}: expected only id, client or node, and secret")
    kid, secret = entry.get("id"), entry.get("secret")
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid) or kid == "default":
        raise _fail(path, f"{where}: id must be 1-64 of A-Z a-z 0-9 . _ - (and not 'default')")
    if kid in seen:
        raise _fail(path, f"{where}: key id {kid!r} appears twice")
    seen.add(kid)
    if ("client" in entry) == ("node" in entry):
        raise _fail(path, f"{where} ({kid}): give exactly one of client = ... or node = ...")
    kind = "client" if "client" in entry else "node"
    name = entry[kind]
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        raise _fail(path, f"{where} ({kid}): {kind} name {name!r} is not a valid name")
    if kind == "client" and name == "shared":
        raise _fail(path, f"{where} ({kid}): 'shared' names the shared secret; pick another")
    if not isinstance(secret, str) or not SECRET_RE.fullmatch(secret):
        raise _fail(path, f"{where} ({kid}): secret must be 64 lowercase hex characters")
    return kid, Identity(kind, name), bytes.fromhex(secret)


def _client_policy(path: Path, name: str, spec: Any) -> ClientPolicy:
    from opsbay_mqtt.policy import ClientPolicy

    if not isinstance(spec, dict) or set(spec) - {"targets", "commands"}:
        raise _fail(path, f"clients.{name}: expected only targets and commands")
    out: dict[str, tuple[str, ...]] = {}
    for key in ("targets", "commands"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise _fail(path, f"clients.{name}.{key}: expected a list of strings")
            out[key] = tuple(value)
    return ClientPolicy(targets=out.get("targets"), commands=out.get("commands"))


def new_key(kind: str, name: str, now: dt.datetime) -> tuple[str, str]:
    """A fresh (key id, secret hex) for an identity."""
    if kind not in ("client", "node"):
        raise Refused("bad_kind", "the kind of key is client or node")
    if not NODE_NAME_RE.fullmatch(name):
        raise Refused("bad_node_name", f"invalid name {name!r}: use 1-63 of A-Z a-z 0-9 . _ -")
    kid = f"{name}-{now:%Y%m%d}-{random_hex(2)}"[-64:]
    return kid, random_hex(32)


def key_entry(kid: str, kind: str, name: str, secret_hex: str) -> str:
    return f'[[keys]]\nid = "{kid}"\n{kind} = "{name}"\nsecret = "{secret_hex}"\n'


def new_key_instructions(kind: str, name: str, prefix: str = "opsbay") -> tuple[str, str]:
    """What `opsbay keys` prints, and the key file entry itself."""
    kid, secret_hex = new_key(kind, name, dt.datetime.now(dt.UTC))
    entry = key_entry(kid, kind, name, secret_hex)
    import secrets  # only here: `secrets` imports `random`, which no other command needs

    password = secrets.token_urlsafe(18)
    if kind == "client":
        acl = (
            f"user {name}\n"
            + "".join(f"topic deny {prefix}/{t}/{name}/#\n" for t in ("nodes", "results", "output"))
            + f"topic write {prefix}/submit\n"
            f"topic write {prefix}/rpc/request\n"
            + "".join(
                f"topic read {prefix}/{t}\n"
                for t in ("jobs/#", "rpc/reply/#", "results/#", "output/#", "nodes/#", "rejected")
            )
        )
        own = f"the client's own key file (on the host that runs `opsbay submit` as {name})"
    else:
        acl = "(nothing: the `pattern` lines of mosquitto/acl.example cover every node)\n"
        own = f"the worker's key file on node {name} (only this node's keys)"
    text = (
        f"# New key {kid} for {kind} {name}.\n"
        "#\n"
        "# 1. Add this entry to the coordinator's key file (OPSBAY_KEY_FILE), then restart it:\n"
        "#\n"
        f"{entry}"
        "#\n"
        f"# 2. Put the same entry in {own},\n"
        "#    readable only by the user that runs opsbay (chmod 600), and point OPSBAY_KEY_FILE\n"
        "#    at it. A party signs with the last of its keys in the file and accepts all.\n"
        "#\n"
        f"# 3. On the broker (mosquitto/production.conf), a login for {name}:\n"
        f"#      mosquitto_passwd -b /etc/mosquitto/opsbay/passwd {name} '{password}'\n"
        "#    and in /etc/mosquitto/opsbay/acl:\n"
        + "".join(f"#      {line}\n" for line in acl.splitlines())
        + "#    then reload Mosquitto (kill -HUP) and connect with\n"
        f"#      OPSBAY_BROKER=mqtts://{name}:{password}@BROKER:8883\n"
    )
    return text, entry
