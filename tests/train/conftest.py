"""The shapes world: a pre-trained tiny base and chat-JSONL task files, built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class World:
    base: Path
    data: Path

    def file(self, task: str, split: str) -> Path:
        return self.data / f"{task}-{split}.jsonl"


@pytest.fixture(scope="session")
def world(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    from lorafleet.train.shapes import write_task

    root = tmp_path_factory.mktemp("world")
    for task, n_train in (("json", 400), ("general", 400)):
        if n_train:
            write_task(task, n_train, root / "data" / f"{task}-train.jsonl", seed=0)
        write_task(task, 40, root / "data" / f"{task}-val.jsonl", seed=1)
    return World(base=tiny_model, data=root / "data")
