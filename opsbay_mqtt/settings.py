"""Settings shared by every command that talks to the bus, validated once, each error naming
its setting."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from opsbay_mqtt import keys
from opsbay_mqtt.errors import ConfigError, Refused
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics
from opsbay_mqtt.transport import Brokers, BrokerURL, TlsFiles

if TYPE_CHECKING:  # the coordinator's client policies: imported by whoever reads them
    from opsbay_mqtt.policy import ClientPolicy


@dataclass(frozen=True)
class BusOptions:
    """The common options as given (flags or environment)."""

    broker: str = "mqtt://127.0.0.1:1883"
    secret: str | None = None
    secret_file: Path | None = None
    key_file: Path | None = None
    prefix: str = "opsbay"
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass(frozen=True)
class Settings:
    brokers: Brokers  # tried in this order (transport.Connection moves along the list)
    topics: Topics
    keyring: Keyring
    tls: TlsFiles = field(default_factory=TlsFiles)
    clients: Mapping[str, ClientPolicy] = field(default_factory=dict)
    node_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def url(self) -> BrokerURL:
        """The first broker of the list (all of them speak the same MQTT version)."""
        return self.brokers[0]


def _shared(opts: BusOptions) -> bytes | None:
    secret = opts.secret
    if opts.secret_file is not None:
        secret = keys.read_private(opts.secret_file, "--secret-file / OPSBAY_SECRET_FILE").strip()
        if not secret:
            raise ConfigError(f"--secret-file / OPSBAY_SECRET_FILE: {opts.secret_file} is empty")
    return secret.encode() if secret else None


def _files_exist(opts: BusOptions) -> TlsFiles:
    for path, setting in (
        (opts.ca_file, "--ca-file / OPSBAY_CA_FILE"),
        (opts.client_cert, "--client-cert / OPSBAY_CLIENT_CERT"),
        (opts.client_key, "--client-key / OPSBAY_CLIENT_KEY"),
    ):
        if path is not None and not path.is_file():
            raise ConfigError(f"{setting}: no such file {path}")
    if (opts.client_cert is None) != (opts.client_key is None):
        raise ConfigError("--client-cert and --client-key go together")
    return TlsFiles(
        ca_file=str(opts.ca_file) if opts.ca_file else None,
        cert_file=str(opts.client_cert) if opts.client_cert else None,
        key_file=str(opts.client_key) if opts.client_key else None,
    )


def has_key(opts: BusOptions) -> bool:
    return bool(opts.secret) or opts.secret_file is not None or opts.key_file is not None


def connection(opts: BusOptions) -> tuple[Brokers, Topics, TlsFiles]:
    """Where the bus is: what every party needs, with or without a key."""
    brokers = BrokerURL.parse_list(opts.broker)
    try:
        topics = Topics(opts.prefix)
    except Refused as e:
        raise ConfigError(f"--prefix / OPSBAY_PREFIX: {e.text}") from e
    return brokers, topics, _files_exist(opts)


def resolve(opts: BusOptions, role: str, name: str | None = None) -> Settings:
    """Settings for a `client`, the `coordinator`, or the worker of node `name`."""
    brokers, topics, tls = connection(opts)
    shared = _shared(opts)
    file = keys.load(opts.key_file) if opts.key_file is not None else None
    if shared is None and file is None:
        raise ConfigError(
            "no key: set OPSBAY_SECRET (or --secret-file) to the bus's shared secret, or "
            "OPSBAY_KEY_FILE (--key-file) to this party's key file"
        )
    signing_kid = None
    if file is not None and role in ("client", "node"):
        signing_kid = file.signing_kid(role, name)
        if signing_kid is None and shared is None:
            who = f"node {name!r}" if role == "node" else "a client"
            raise ConfigError(f"--key-file / OPSBAY_KEY_FILE: {opts.key_file} has no key for {who}")
    elif file is not None and shared is None and file.keys:
        signing_kid = file.keys[0][0]  # the coordinator signs for each reader with its key
    return Settings(
        brokers=brokers,
        topics=topics,
        keyring=keys.keyring(file, shared, signing_kid),
        tls=tls,
        clients=file.clients if file is not None and role == "coordinator" else {},
        node_labels=file.node_labels if file is not None and role == "coordinator" else {},
    )
