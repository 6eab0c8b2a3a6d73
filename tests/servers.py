"""Real servers for the tests (importable as ``servers``): ``mlflow server`` and the scoring
server of ``mlflow models serve``, each in a process group of its own (uvicorn's workers in
it), stopped by that group's id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

MLFLOW = [sys.executable, "-m", "mlflow"]
START_TIMEOUT_S = 240  # mlflow server takes 15 s to answer on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_until_up(process: subprocess.Popen, url: str, log: Path) -> None:
    """Until ``url`` answers 200; an error with the log's end if the process exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"{' '.join(map(str, process.args))} did not answer {url}:\n{tail}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    """Kill the process's group (SIGKILL: a server that goes down, not one that shuts down)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


class TrackingServer:
    """``mlflow server`` on 127.0.0.1 at a free port: a SQLite backend and served artifacts
    (``--artifacts-destination``), both in ``folder``, which outlive a stop and a start."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            *MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        # its job runner (huey consumers for GenAI jobs) is seven more processes, unused here
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = self.folder / "server.log"
        with open(log, "a") as out:
            self.process = subprocess.Popen(
                command, cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        wait_until_up(self.process, f"{self.uri}/health", log)

    def stop(self) -> None:
        """Down at once; nothing listens on the port when this returns."""
        if self.process is not None:
            stop(self.process)
            self.process = None
        assert not answers(f"{self.uri}/health"), "the port still answers after the stop"


@contextmanager
def model_server(model_uri: str, env: dict[str, str], folder: Path) -> Iterator[str]:
    """``mlflow models serve -m MODEL_URI --env-manager local`` at a free port: its URL."""
    port = free_port()
    log = folder / "serve.log"
    command = [*MLFLOW, "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(process, f"{url}/ping", log)
        yield url
    finally:
        stop(process)


def invoke(url: str, records: list[dict]) -> dict:
    """POST ``records`` to a scoring server's /invocations; its JSON answer."""
    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(
        f"{url}/invocations", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())
