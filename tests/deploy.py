"""The NATS configurations of ``deploy/``, run as they are on loopback by the tests.

Only what a test machine must differ in is changed: JetStream's store directory (a
temporary one instead of ``/data``), the ports (free ones, by command-line flags that
win over the files), and the passwords (random, in the server's environment, where
the files read them from)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NATS_CONFIGS = sorted((DEPLOY / "nats").glob("*.conf"))
USERS = ("conductor", "weather", "agenda", "brewery", "client", "admin")
SERVICES = ("conductor", "weather", "agenda", "brewery")


def passwords() -> dict[str, str]:
    """Random ones. nats-server parses an environment value as a configuration value, so
    a password starts with a letter (a leading digit or '-' would be read as a number)."""
    return {user: "p" + secrets.token_hex(16) for user in USERS}


def server_env(passwords: dict[str, str], **more: str) -> dict[str, str]:
    """The environment the deploy configurations read their ``$VARIABLES`` from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAPELLMEISTER_")}
    env.update({f"KAPELLMEISTER_{user.upper()}_PASSWORD": pw for user, pw in passwords.items()})
    env.update(more)
    return env


def nats_configs(into: Path, store_dir: Path) -> Path:
    """Copies of ``deploy/nats/*.conf`` in ``into``, storing JetStream in ``store_dir``."""
    into.mkdir(parents=True, exist_ok=True)
    for config in NATS_CONFIGS:
        text = config.read_text()
        assert "store_dir: /data" in text or "store_dir" not in text, config
        (into / config.name).write_text(
            text.replace("store_dir: /data", f'store_dir: "{store_dir}"')
        )
    return into


def service_env(user: str, passwords: dict[str, str], **more: str) -> dict[str, str]:
    """A service's environment under its own NATS user, as deploy/compose.yaml sets it."""
    return {
        "NATS_USER": user,
        "NATS_PASSWORD": passwords[user],
        "NATS_INBOX_PREFIX": f"_INBOX_{user}",
        **more,
    }
