"""The README's tour, Getting started and the feedback loop run as written: their shell and Python
blocks, in order, in a fresh home and a folder holding only `.venv`, against the gateway their own
`lorafleet serve` starts. What is left out: Getting started's "Install" (`make setup` built this
environment) and "The demo" (`make demo`, minutes of training of its own; it is the README's first
command, run by hand before a release)."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lorafleet.chat_jsonl import load_jsonl
from tests.helpers import poll_until

pytestmark = [pytest.mark.engine, pytest.mark.training]

REPO = Path(__file__).parents[1]
GATEWAY = "http://127.0.0.1:8000"  # where the pages say `lorafleet serve` listens
_FENCE = re.compile(r"^```(bash|python)\n(.*?)^```$", re.S | re.M)
_SERVE = re.compile(r"\blorafleet serve\b")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str  # bash | python
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.language})"


def blocks(page: Path, section: str, until: str | None = None) -> list[Block]:
    """The page's bash and Python blocks from the heading `section` (to the heading `until`)."""
    text = page.read_text()
    start = text.index(section)
    end = text.index(until, start) if until else len(text)
    return [
        Block(page.name, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
        for m in _FENCE.finditer(text, start, end)
    ]


def commands(code: str) -> list[str]:
    """A shell block's commands: lines joined across their `\\` continuations."""
    return code.replace("\\\n", "").splitlines()


@dataclass(frozen=True)
class Ran:
    block: Block
    stdout: str


class Newcomer:
    """One shell's state across blocks (what `export` sets carries to the next block, as it would
    in a terminal) and the gateway `lorafleet serve` started, in its own process group."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.clone = root / "lorafleet"  # a fresh clone's place: its `.venv` is this one's
        self.home.mkdir()
        self.clone.mkdir()
        (self.clone / ".venv").symlink_to(REPO / ".venv")
        self._env_file = root / "env"
        cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")} | {
            "HOME": str(self.home),  # ~/.lorafleet is the newcomer's
            "XDG_CACHE_HOME": cache,  # vLLM's and torch's compiled kernels are not
        }
        self.gateway: subprocess.Popen | None = None

    def run(self, block: Block) -> Ran:
        print(f"running {block}", file=sys.stderr)
        if block.language == "python":
            script = self.clone / f"block-{block.line}.py"
            script.write_text(block.code)
            return self._check(block, [".venv/bin/python", script.name])
        lines = commands(block.code)
        serving = [i for i, line in enumerate(lines) if _SERVE.search(line)]
        if not serving:
            return self._shell(block, lines)
        [at] = serving
        ran = self._shell(block, lines[:at])
        self._serve(block, lines[at])
        return ran

    def _shell(self, block: Block, lines: list[str]) -> Ran:
        script = "set -euo pipefail\n" + "\n".join(lines) + f"\nenv -0 > {self._env_file}\n"
        ran = self._check(block, ["bash", "-c", script])
        self.env = dict(
            entry.split("=", 1) for entry in self._env_file.read_text().split("\0") if "=" in entry
        )
        return ran

    def _check(self, block: Block, argv: list[str]) -> Ran:
        done = subprocess.run(argv, cwd=self.clone, env=self.env, capture_output=True, text=True)
        # what a reader would have seen, block by block
        with (self.home / "transcript.txt").open("a") as transcript:
            transcript.write(f"=== {block}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, (
            f"{block} exited {done.returncode}:\n{block.code}\n--- stdout\n{done.stdout[-4000:]}"
            f"\n--- stderr\n{done.stderr[-4000:]}"
        )
        return Ran(block, done.stdout)

    def _serve(self, block: Block, line: str) -> None:
        """`lorafleet serve` runs until stopped: in the background, like another terminal, until
        its gateway says ready."""
        assert self.gateway is None, f"{block} starts a second gateway"
        log = (self.home / "serve.log").open("wb")
        self.gateway = subprocess.Popen(
            ["bash", "-c", f"exec {line}"],
            cwd=self.clone,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            assert self.gateway is not None and self.gateway.poll() is None, (
                f"{block}: `{line}` exited:\n{self.serve_log()}"
            )
            try:
                return httpx.get(f"{GATEWAY}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        poll_until(ready, 900, f"{block}: the gateway `{line}` started", every=1)

    def serve_log(self) -> str:
        return (self.home / "serve.log").read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            os.killpg(self.gateway.pid, signal.SIGTERM)
            try:
                self.gateway.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.gateway.pid, signal.SIGKILL)
                self.gateway.wait()


@pytest.fixture
def newcomer(tmp_path: Path) -> Iterator[Newcomer]:
    try:
        httpx.get(GATEWAY, timeout=1)
    except httpx.HTTPError:
        pass
    else:
        pytest.fail(f"something already listens on {GATEWAY}, where the pages' gateway goes")
    person = Newcomer(tmp_path)
    yield person
    person.stop()


README = REPO / "README.md"
GETTING_STARTED = REPO / "docs" / "getting-started.md"
FEEDBACK_LOOP = REPO / "docs" / "feedback-loop.md"


def test_the_readme_tour_is_getting_started():
    """One list of first steps: the README's tour runs the blocks Getting started runs."""
    tour = blocks(README, "## A five-minute tour", "\n## ")
    started = blocks(GETTING_STARTED, "## First serve")
    assert tour and [b.code for b in tour] == [b.code for b in started]


def test_getting_started_then_the_feedback_loop_run_as_written(newcomer: Newcomer):
    started = [newcomer.run(b) for b in blocks(GETTING_STARTED, "## First serve")]
    # the first chat answered in the adapter's JSON
    [chat] = [r for r in started if r.block.language == "python"]
    assert set(json.loads(chat.stdout)) == {"shape", "color"}, chat.stdout
    # the canary passed its gate (`rollout start` exits 1 on a refusal) and waits at its first step
    assert "Progressing" in started[-1].stdout, started[-1].stdout

    looped = [newcomer.run(b) for b in blocks(FEEDBACK_LOOP, "The loop, run as written", "\n## ")]
    [users] = [r for r in looped if r.block.language == "python"]
    judged = ast.literal_eval(users.stdout)
    assert sum(judged.values()) == 64, users.stdout
    # every judged answer became a training line (the curl's included), each a right answer: the
    # served one where users agreed, their correction where they did not
    corrections = load_jsonl(newcomer.clone / "corrections.jsonl")
    assert len(corrections) == 65
    assert all(
        set(json.loads(e.messages[-1]["content"])) == {"shape", "color"} for e in corrections
    )
    # the retrained version passed the gate and is the canary now
    assert "extractor@3" in looped[-1].stdout and "Progressing" in looped[-1].stdout, looped[
        -1
    ].stdout
    # opting out deleted the captures
    with httpx.Client(
        base_url=GATEWAY,
        headers={"Authorization": f"Bearer {newcomer.env['LORAFLEET_API_KEY']}"},
    ) as http:
        assert http.get("/v1/captures").json()["data"] == []
