"""Services as child processes, the way they are deployed: ``python -m services.<name>``.

Used by the demo, the end-to-end tests and the benchmarks. Each child gets a clean
environment plus ``NATS_URL`` and what the caller adds, writes its log to a file, and
is ended by its PID only: SIGTERM (it drains and exits), then SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import nats.errors
from nats.aio.client import Client

__all__ = ["ServiceProcess", "wait_for_services"]

# What a child inherits from us; everything else it gets from `env`.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")


class ServiceProcess:
    """One service as a child process (``python -m services.<name>`` unless ``argv`` says)."""

    def __init__(
        self,
        name: str,
        nats_url: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv or [sys.executable, "-m", f"services.{name}"])
        self.nats_url = nats_url
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> ServiceProcess:
        env = {k: os.environ[k] for k in _INHERITED if k in os.environ}
        env.update(self.env)
        env["NATS_URL"] = self.nats_url
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env=env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (the service drains); SIGKILL if it does not exit in time."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close()
        return process.returncode

    def pause(self) -> None:
        """SIGSTOP: frozen mid-flight, as a stalled host (crash tests)."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash: no drain, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, size: int = 3000) -> str:
        return (
            self.log_path.read_bytes()[-size:].decode(errors="replace")
            if self.log_path.exists()
            else ""
        )


async def wait_for_services(
    nc: Client,
    names: list[str],
    timeout: float = 30.0,
    processes: list[ServiceProcess] | None = None,
) -> None:
    """Wait until every named service answers ``$SRV.PING.<name>``.

    Raises:
        RuntimeError: one did not answer in time or its process died; with its log tail.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for name in names:
        while True:
            try:
                await nc.request(f"$SRV.PING.{name}", b"", timeout=0.5)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                dead = [p for p in processes or [] if p.name == name and not p.alive()]
                if dead or loop.time() > deadline:
                    tail = dead[0].log_tail() if dead else ""
                    raise RuntimeError(f"service {name} did not start\n{tail}") from None
                await asyncio.sleep(0.1)
