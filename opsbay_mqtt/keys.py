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

    [nodes.web-01]                 # in the coordinator's file: the labels web-01 may claim
    labels = { role = "web", region = "eu-west" }
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsbay_mqtt.errors import ConfigError, Refused
from opsbay_mqtt.signing import KID_RE, Identity, Keyring, random_hex
from opsbay_mqtt.topics import NODE_NAME_RE

if TYPE_CHECKING:  # policies are read only from key files that have them
    from opsbay_mqtt.policy import ClientPolicy

SECRET_RE = re.compile(r"[0-9a-f]{64}")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9._/-]{1,64}")
CLIENT_NAME_RE = NODE_NAME_RE


@dataclass(frozen=True)
class KeyFile:
    keys: list[tuple[str, Identity, bytes]]  # (key id, identity, secret), in file order
    clients: dict[str, ClientPolicy] = field(default_factory=dict)
    node_labels: dict[str, dict[str, str]] = field(default_factory=dict)  # [nodes.NAME] labels

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
    return ConfigError(f"{KEY_FILE}: {path}: {text}")


KEY_FILE = "--key-file / OPSBAY_KEY_FILE"


def read_private(path: Path, setting: str) -> str:
    """A secret file's text, refused (as ssh refuses an unprotected private key) when anyone
    but its owner may read or change it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{setting}: {path}: cannot read: {e.strerror}") from e
    if mode & 0o077:
        raise ConfigError(
            f"{setting}: {path}: UNPROTECTED: its mode {stat.S_IMODE(mode):04o} lets other users "
            f"read or change it, so it is refused; run: chmod 600 {path} (and own it by the user "
            "that runs opsbay)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{setting}: {path}: not UTF-8 text: {e}") from e


def load(path: Path) -> KeyFile:
    import tomllib  # here: every CLI call imports this module, few read a key file

    text = read_private(path, KEY_FILE)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _fail(path, f"not valid TOML: {e}") from e
    unknown = set(data) - {"keys", "clients", "nodes"}
    if unknown:
        raise _fail(path, f"unknown section(s) {', '.join(sorted(unknown))}")
    keys: list[tuple[str, Identity, bytes]] = []
    seen: set[str] = set()
    for i, entry in enumerate(data.get("keys", [])):
        keys.append(_key(path, i, entry, seen))
    clients = {}
    for name, spec in data.get("clients", {}).items():
        clients[name] = _client_policy(path, name, spec)
    node_labels = {name: _node_labels(path, name, spec) for name, spec in _table(data, "nodes")}
    return KeyFile(keys=keys, clients=clients, node_labels=node_labels)


def _table(data: dict[str, Any], section: str) -> list[tuple[str, Any]]:
    value = data.get(section, {})
    return list(value.items()) if isinstance(value, dict) else []


def _node_labels(path: Path, name: str, spec: Any) -> dict[str, str]:
    """`[nodes.NAME] labels = {...}`: the labels node NAME may claim (key 1-64 of
    A-Z a-z 0-9 . _ / -, value at most 256 characters, as in the protocol)."""
    if not NODE_NAME_RE.fullmatch(name):
        raise _fail(path, f"nodes.{name}: {name!r} is not a valid node name")
    if not isinstance(spec, dict) or set(spec) - {"labels"}:
        raise _fail(path, f'nodes.{name}: expected only labels = {{ key = "value", ... }}')
    labels = spec.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and LABEL_KEY_RE.fullmatch(k) and isinstance(v, str) and len(v) <= 256
        for k, v in labels.items()
    ):
        raise _fail(
            path,
            f'nodes.{name}.labels: expected key = "value" pairs (keys 1-64 of '
            "A-Z a-z 0-9 . _ / -, values at most 256 characters)",
        )
    return dict(labels)


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


KINDS = ("client", "node", "coordinator", "watcher")  # what `opsbay keys` makes
DAEMONS = ("coordinator", "node")  # their logins and listener differ (mosquitto/production.conf)
PASSWD_DIR = Path("/etc/mosquitto/opsbay")


def passwd_file_of(kind: str, directory: Path = PASSWD_DIR) -> Path:
    """The broker's password file for a login of this kind: the daemons' or the clients'."""
    return directory / ("passwd-daemons" if kind in DAEMONS else "passwd-clients")


def port_of(kind: str) -> int:
    """The TLS port of production.conf's listener for this kind of login."""
    return 8883 if kind in DAEMONS else 8884


def new_key_instructions(
    kind: str,
    name: str | None,
    prefix: str = "opsbay",
    *,
    appended: tuple[Path, ...] = (),
    passwd_file: Path | None = None,
) -> tuple[str, str]:
    """What `opsbay keys` prints, and the key file entry itself ("" for a coordinator or a
    watcher, which get only a broker login: the coordinator's keys are every other party's, and
    a watcher only reads)."""
    if kind not in KINDS:
        raise Refused("bad_kind", f"the kind is one of {', '.join(KINDS)}, not {kind!r}")
    if name is None and kind != "coordinator":
        raise Refused("bad_node_name", f"a {kind} needs a NAME: opsbay keys {kind} NAME")
    name = name or "coordinator"
    if not NODE_NAME_RE.fullmatch(name):
        raise Refused("bad_node_name", f"invalid name {name!r}: use 1-63 of A-Z a-z 0-9 . _ -")
    if kind in DAEMONS and name.startswith("opsbay-"):
        raise Refused(
            "bad_node_name",
            f"{name!r}: a node or coordinator login may not start with opsbay- (client ids "
            "that do are the clients'; see mosquitto/production.conf)",
        )
    passwd_file = passwd_file or passwd_file_of(kind)
    import secrets  # only here: `secrets` imports `random`, which no other command needs

    password = secrets.token_urlsafe(18)
    steps: list[str] = []
    entry = ""
    if kind in ("client", "node"):
        kid, secret_hex = new_key(kind, name, dt.datetime.now(dt.UTC))
        entry = key_entry(kid, kind, name, secret_hex)
        steps += _key_steps(kind, name, kid, entry, appended)
    steps.append(_login_step(name, password, passwd_file))
    steps.append(_acl_step(kind, name, prefix))
    steps.append(
        f"Give {name} its login in its environment, never on a command line (`ps` shows those):\n"
        f"  OPSBAY_BROKER=mqtts://{name}:{password}@BROKER:{port_of(kind)}\n"
        "and, for a private CA, OPSBAY_CA_FILE=/etc/opsbay/ca.crt: for a systemd unit, in its\n"
        "EnvironmentFile= (mode 0600, see systemd/). BROKER must match a subjectAltName of the\n"
        "broker's certificate."
    )
    if kind in ("client", "node"):
        steps.append(
            "Rotating only the key? The broker login is separate: skip steps 3 to 5 and keep the\n"
            "current password (or change it too: steps 3 to 5 replace it)."
        )
    head = f"# New broker login for {kind} {name}.\n"
    if entry:
        head = f"# New key {entry.split(chr(34))[1]} for {kind} {name}, and a broker login.\n"
    body = "".join(
        "#\n" + "".join(f"#{'' if not ln else ' '}{ln}\n" for ln in _numbered(i, step))
        for i, step in enumerate(steps, 1)
    )
    # The entry itself is not commented out, so that the output is also a valid key file.
    return head + body.replace(f"#    {_ENTRY}\n", entry), entry


_ENTRY = "<the entry>"


def _numbered(i: int, step: str) -> list[str]:
    lines = step.splitlines()
    return [f"{i}. {lines[0]}"] + [("   " + ln if ln else "") for ln in lines[1:]]


def _key_steps(kind: str, name: str, kid: str, entry: str, appended: tuple[Path, ...]) -> list[str]:
    own = (
        f"the key file of client {name} (on the hosts that submit as {name})"
        if kind == "client"
        else f"the worker's key file on node {name} (only this node's keys)"
    )
    if appended:
        first = (
            f"Appended to {', '.join(str(p) for p in appended)} (mode 600): do not add it there\n"
            "again (a key id that appears twice makes a key file refused). Restart the\n"
            "coordinator if that is its key file (OPSBAY_KEY_FILE); otherwise add the entry\n"
            "to the coordinator's key file too, then restart it:"
        )
        where = (
            f"Put the same entry in {own},\nunless one of the files above is that one "
            "(give --append twice, once per file, to\nnever copy the secret by hand)."
        )
    else:
        first = "Add this entry to the coordinator's key file (OPSBAY_KEY_FILE), then restart it:"
        where = f"Put the same entry in {own}."
    return [
        f"{first}\n{_ENTRY}",
        f"{where}\nOnly its owner may read it (chmod 600: opsbay refuses it otherwise); point\n"
        "OPSBAY_KEY_FILE at it. A party signs with the last of its keys in the file and\n"
        "accepts all.",
    ]


def _login_step(name: str, password: str, passwd_file: Path) -> str:
    return (
        f"On the broker, as root, give {name} its login in the password file: this works on a\n"
        "new file too, and keeps the password off command lines (mosquitto_passwd reads it\n"
        "twice from standard input); it replaces an earlier password of the same user.\n"
        "\n"
        "  umask 027    # the file never readable by others, not even for a moment\n"
        f"  touch {passwd_file}\n"
        f"  mosquitto_passwd {passwd_file} {name} <<'EOF'\n"
        f"  {password}\n"
        f"  {password}\n"
        "  EOF\n"
        f"  chgrp mosquitto {passwd_file}; chmod 0640 {passwd_file}\n"
        "\n"
        "(Not mosquitto_passwd -c, which empties an existing file, nor -b, which puts the\n"
        "password on its command line, nor -U on the password file, which hashes the hashes.)"
    )


def _acl_step(kind: str, name: str, prefix: str) -> str:
    deny = "".join(f"topic deny {prefix}/{t}/{name}/#\n" for t in ("nodes", "results", "output"))
    if kind == "node":
        return (
            "ACL: nothing to add, the `pattern` lines of mosquitto/acl.example cover every node\n"
            "whose login is its node name. Reload Mosquitto: systemctl reload mosquitto"
        )
    if kind == "coordinator":
        acl = f"user {name}\ntopic readwrite {prefix}/#\n"
    elif kind == "watcher":
        acl = f"user {name}\n{deny}topic read {prefix}/#\n"
    else:
        reads = ("jobs/#", "rpc/reply/#", "results/#", "output/#", "nodes/#", "rejected")
        acl = (
            f"user {name}\n{deny}topic write {prefix}/submit\ntopic write {prefix}/rpc/request\n"
            + "".join(f"topic read {prefix}/{t}\n" for t in reads)
        )
    block = "".join(f"  {ln}\n" for ln in acl.splitlines())
    # mosquitto/acl.example ships these users' blocks already.
    known = (kind, name) in (("coordinator", "coordinator"), ("client", "ci"), ("client", "cron"),
                             ("watcher", "watcher"))  # fmt: skip
    have = " (acl.example has it already: nothing to add)" if known else ""
    return (
        f"In the broker's ACL file (/etc/mosquitto/opsbay/acl){have}:\n\n{block}\n"
        "then reload Mosquitto: systemctl reload mosquitto"
    )
