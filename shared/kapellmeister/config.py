"""Settings from the environment, read once in ``__main__`` and passed down.

Twelve-factor: ``NATS_URL`` and its credentials, the standard ``OTEL_*`` variables
(read by the OpenTelemetry SDK itself), and ``KAPELLMEISTER_*`` for our own knobs.
Nothing else in the library reads ``os.environ``.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

__all__ = ["Settings"]

_PREFIX = "KAPELLMEISTER_"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a service needs to connect and tune itself."""

    nats_url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Replies and pulled messages come to subjects under this prefix: give each service
    # its own (``_INBOX_weather``) and NATS permissions keep others from reading them.
    # None: nats-py's ``_INBOX``.
    inbox_prefix: str | None = None
    # Replicas of streams and buckets this process creates (3 on a production cluster).
    replicas: int = 1
    # Tasks one agent process runs at once, facts one conductor process decides at once.
    concurrency: int = 64
    # Seconds JetStream waits for an ack before redelivering; agents heartbeat within it.
    ack_wait_s: float = 30.0
    # Deliveries of one task message before the agent gives up and fails the task.
    max_deliver: int = 5
    # How often the conductor's sweeper re-drives non-terminal workflows (seconds).
    sweep_interval_s: float = 30.0
    # The sweeper leaves workflows updated in the last few seconds to their writer.
    sweep_grace_s: float = 5.0
    # A task input or output whose JSON is longer than this (bytes) has its biggest
    # values stored in the `payloads` Object Store bucket, by reference (claim check).
    payload_threshold: Annotated[int, msgspec.Meta(ge=1024, le=524_288)] = 65_536
    # How often the conductor removes the payload objects of workflows that are gone.
    payload_collect_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    # How long a concurrency slot's holder is trusted before the sweeper checks its saga
    # (`kapellmeister.slots`): the longest a slot stays taken after a crash lost its release.
    slot_lease_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # The workflow index (`conductor.list`, the sweeper) follows the sagas this much later.
    index_flush_s: Annotated[float, msgspec.Meta(gt=0)] = 0.25
    # And is rebuilt from the sagas at start and this often (seconds), to mend what a
    # crashed process left unwritten.
    index_reconcile_s: Annotated[float, msgspec.Meta(gt=0)] = 900.0
    # After SIGTERM, how long a service may take to finish what runs and drain before it
    # exits anyway (unfinished work is redelivered); under docker stop's 10 s.
    shutdown_s: float = 8.0
    # How long a finished workflow is kept (seconds) when its definition says nothing
    # (`retention_s`); None: kept until someone removes it.
    retention_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # Extra directories of definition files the conductor loads (os.pathsep-separated).
    definitions: str = ""
    # The directory the demo keeps its embedded server's JetStream data in.
    data_dir: str = ".kapellmeister"
    log_level: str = "INFO"
    # Log lines as JSON, as text, or JSON unless stderr is a terminal ("auto").
    log_format: Literal["auto", "json", "text"] = "auto"
    # Serve /metrics for Prometheus on this port (and host), if set.
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    # Serve /livez and /readyz (connected, consumers bound) on this port (and host), if set.
    health_port: int | None = None
    health_host: str = "0.0.0.0"
    # The web UI links each workflow to its trace here: ``{trace_id}`` is replaced, e.g.
    # ``http://127.0.0.1:16686/trace/{trace_id}`` for Jaeger. Empty: no link.
    trace_url: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default: ``os.environ``).

        Raises:
            ValueError: a variable has the wrong type, naming the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        source: dict[str, str] = {}
        if "NATS_URL" in env:
            values["nats_url"], source["nats_url"] = env["NATS_URL"], "NATS_URL"
        for field in cls.__struct_fields__:
            name = _PREFIX + field.upper()
            if name in env:
                values[field], source[field] = env[name], name
        for short, field in (
            ("NATS_USER", "user"),
            ("NATS_PASSWORD", "password"),
            ("NATS_TOKEN", "token"),
            ("NATS_CREDS", "creds_file"),
            ("NATS_NKEY", "nkey_seed_file"),
            ("NATS_CA", "tls_ca_file"),
            ("NATS_CERT", "tls_cert_file"),
            ("NATS_KEY", "tls_key_file"),
            ("NATS_INBOX_PREFIX", "inbox_prefix"),
        ):
            if short in env and field not in values:
                values[field], source[field] = env[short], short
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            message = str(exc)
            for field, name in source.items():
                if message.endswith(f"`$.{field}`"):
                    raise ValueError(f"{name}={env[name]!r}: {message}") from exc
            raise ValueError(f"bad setting: {message}") from exc

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` from the credentials set."""
        options: dict[str, Any] = {"servers": [s.strip() for s in self.nats_url.split(",")]}
        if self.inbox_prefix is not None:
            options["inbox_prefix"] = self.inbox_prefix
        if self.user is not None:
            options["user"] = self.user
            options["password"] = self.password or ""
        if self.token is not None:
            options["token"] = self.token
        if self.creds_file is not None:
            options["user_credentials"] = self.creds_file
        if self.nkey_seed_file is not None:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.tls_ca_file or self.tls_cert_file:
            context = ssl.create_default_context(cafile=self.tls_ca_file)
            if self.tls_cert_file:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
            options["tls"] = context
        return options
