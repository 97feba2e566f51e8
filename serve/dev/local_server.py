"""`lorafleet serve` as a child process on loopback: used by the demo, the benchmarks and the
tests."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from lorafleet.serve.engine.command import free_port

__all__ = ["LocalServer"]


@dataclass
class LocalServer:
    """A gateway (+ its engine) started with `LORAFLEET_*` settings given as keyword arguments."""

    url: str
    admin_key: str
    home: Path
    process: subprocess.Popen
    env: dict[str, str]
    base: str

    @classmethod
    def start(cls, base: Path | str, home: Path, **settings: str) -> LocalServer:
        """Start on a free port; `settings` may pin e.g. `port` or `admin_key` (a second gateway
        on one home)."""
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
        env.update(
            LORAFLEET_HOME=str(home),
            LORAFLEET_ADMIN_KEY=secrets.token_urlsafe(16),
            LORAFLEET_PORT=str(free_port()),
        )
        env.update({f"LORAFLEET_{k.upper()}": str(v) for k, v in settings.items()})
        server = cls(
            url=f"http://127.0.0.1:{env['LORAFLEET_PORT']}",
            admin_key=env["LORAFLEET_ADMIN_KEY"],
            home=home,
            process=None,  # type: ignore[arg-type]
            env=env,
            base=str(base),
        )
        server.process = server._spawn()
        return server

    def _spawn(self) -> subprocess.Popen:
        with open(self.home / "gateway.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "lorafleet.serve.cli", "serve", "--base", self.base],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def restart(self) -> None:
        """Stop the gateway (and its engine) and start it again with the same settings, port and
        state."""
        self.stop()
        self.process = self._spawn()

    def wait_ready(self, timeout: float = 600) -> float:
        """Block until `/readyz` answers 200 (engine up); return the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited with {self.process.returncode}; "
                    f"see {self.home}/gateway.log"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(
            f"the gateway was not ready after {timeout:.0f} s; see {self.home}/gateway.log"
        )

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
