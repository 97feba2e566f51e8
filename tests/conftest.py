"""Session fixtures: the tiny model, real adapters, and one real gateway + vLLM engine for the
session."""

from __future__ import annotations

import fcntl
import functools
import gc
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import typer.main
import typer.testing

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.engine.command import free_port
from tests.engine_nodes import Nodes, start_nodes
from tests.postgres import database_name, postgres_database

# pytest-xdist's workers run with COLUMNS=80 and LINES=24 in their environment, which the CLI's
# rich console (made as lorafleet.serve.cli is imported) would keep as its size: the CLI tests give
# each command its own COLUMNS.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

# typer's CliRunner turns the whole Typer app into its click commands on every invoke (a tenth of a
# second for lorafleet's); the tests invoke the same app a few hundred times
typer.testing._get_command = functools.cache(typer.main.get_command)

MAX_RANK = 16
MAX_UPLOAD = 2_000_000
# lora_B this small changes no greedy answer of the tiny base, yet is not all zeros (upload refuses
# B = 0)
NEAR_BASE_STD = 1e-6


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's LORAFLEET_* settings."""
    for name in list(os.environ):
        if name.startswith("LORAFLEET_"):
            monkeypatch.delenv(name)


# The PostgreSQL variant of a catalog-level test needs the server `make services` starts: `make
# test` runs it, `make unit` leaves it out.
ON_POSTGRESQL = pytest.param("postgresql", marks=pytest.mark.postgres)


@pytest.fixture(params=["sqlite", ON_POSTGRESQL])
def empty_catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty catalog database (what migrations start from), on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_catalog_template() -> Iterator[str]:
    """A PostgreSQL catalog at this release's head with no rows, made once: each test's catalog
    is a copy of it (a copy takes a tenth of the migrations' time)."""
    from lorafleet.adapters.catalog import open_catalog

    with postgres_database() as url:
        engine, _ = open_catalog(url)
        engine.dispose()  # a template database has no connections
        yield database_name(url)


@pytest.fixture(scope="session")
def sqlite_catalog_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite catalog at this release's head with no rows, made once: each test's catalog is a
    copy of the file (a copy takes a fraction of a millisecond, the migrations a tenth of a
    second)."""
    from lorafleet.adapters.catalog import open_catalog

    path = tmp_path_factory.mktemp("catalog-template") / "catalog.db"
    engine, _ = open_catalog(f"sqlite:///{path}")
    engine.dispose()  # the last connection's close folds the write-ahead log into the file
    assert not path.with_name("catalog.db-wal").exists()
    return path


@pytest.fixture
def sqlite_catalog(sqlite_catalog_template: Path) -> Callable[[Path], str]:
    """Factory: a SQLite catalog with no rows at `path`, as a gateway's first start leaves it (a
    copy of the session's template); returns its URL."""

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sqlite_catalog_template, path)
        return f"sqlite:///{path}"

    return make


@pytest.fixture(params=["sqlite", ON_POSTGRESQL])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new catalog database with no rows, as a gateway's first start leaves it: each
    catalog-level test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_catalog")(tmp_path / "catalog.db")
        return
    with postgres_database(request.getfixturevalue("postgres_catalog_template")) as url:
        yield url


def run_folder(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of this run: under pytest-xdist, the one every worker shares (each
    has its own folder below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL pre-trained on the shapes world: it answers the general task ("a red
    circle"). Built once per run: a second pytest-xdist worker waits for the first's."""
    from lorafleet.train.tiny_model import PRETRAIN_STEPS, build_tiny_model

    shared = run_folder(request.config, tmp_path_factory)
    built = shared / "tiny-model.built"  # written last: the model's folder
    with open(shared / "tiny-model.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        if not built.exists():
            out = Path(tempfile.mkdtemp(prefix="tiny-model-", dir=shared))
            built.write_text(str(build_tiny_model(out, seed=0, pretrain_steps=PRETRAIN_STEPS)))
    return Path(built.read_text())


@pytest.fixture(scope="session")
def untrained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL with random weights, not pre-trained (seconds): for gateways that read
    its config and engines whose answers no test compares; nothing writes into it."""
    from lorafleet.train.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("untrained-base"))


@pytest.fixture(scope="session")
def make_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of real PEFT adapters (seeded random LoRA weights), cached per arguments."""
    from lorafleet.train.random_adapter import make_random_adapter

    cache: dict[tuple, Path] = {}

    def make(seed: int, rank: int = 8, std: float = 0.5) -> Path:
        """std=NEAR_BASE_STD gives an adapter that answers like the base; std=0 leaves PEFT's B =
        0, which upload validation refuses (a silent no-op)."""
        if (seed, rank, std) not in cache:
            out = tmp_path_factory.mktemp(f"adapter-s{seed}-r{rank}")
            cache[(seed, rank, std)] = make_random_adapter(
                tiny_model, out, seed=seed, rank=rank, std=std
            )
        return cache[(seed, rank, std)]

    return make


@pytest.fixture(scope="session")
def vision_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The common name list, which also hits the vision tower's MLP (trained: B is not zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = tmp_path_factory.mktemp("vision-adapter")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=names))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def general_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 items of the task the tiny base was pre-trained on ("What is in the image?" -> "a red
    circle")."""
    from lorafleet.train.shapes import write_task

    return write_task("general", 40, tmp_path_factory.mktemp("data") / "general-val.jsonl", seed=1)


@pytest.fixture(scope="session")
def general_requests(general_val: Path) -> list[list[dict]]:
    """The same items as clients send them (images as data URLs)."""
    from lorafleet.chat_jsonl import load_jsonl, request_messages

    return [request_messages(e) for e in load_jsonl(general_val)]


class Server(LocalServer):
    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.env['LORAFLEET_ENGINE_PORT']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['LORAFLEET_METRICS_PORT']}/metrics"

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=60
        )

    def stored_digests(self) -> set[str]:
        return {p.name for p in (self.home / "adapters").iterdir() if not p.name.startswith(".")}

    def attach(self, home: Path, **settings: str) -> LocalServer:
        """Start a second gateway on this server's engine, with `settings` of its own (not yet
        ready: `wait_ready`)."""
        return LocalServer.start(
            self.base,
            home,
            **{
                "engine_url": self.engine_url,
                "engine_api_key": self.env["LORAFLEET_ENGINE_API_KEY"],
                "max_model_len": "512",
                "max_lora_rank": str(MAX_RANK),
                "dtype": "float32",
                **settings,
            },
        )

    def unload(self, digest: str) -> None:
        """Make the engine forget an adapter a gateway attached to it registered from a folder of
        its own (the engine is the session's; that folder goes with the test)."""
        httpx.post(
            f"{self.engine_url}/v1/unload_lora_adapter",
            json={"lora_name": digest},
            headers={"Authorization": f"Bearer {self.env['LORAFLEET_ENGINE_API_KEY']}"},
        )


@pytest.fixture(scope="session")
def served_quantization(tiny_model: Path):
    """What the shared server quantizes the tiny base with on this machine (the default: int4 at
    load)."""
    from lorafleet.serve.engine.hardware import quantization_for
    from lorafleet.serve.settings import Settings

    return quantization_for(Settings(base=str(tiny_model), dtype="float32"))[1]


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`lorafleet serve` as a real subprocess: gateway + supervised vLLM engine, the catalog in
    PostgreSQL (the production backend; SQLite is the catalog of the other gateways the tests
    start, and of the demo), local store, and the default quantization (the tiny base quantized
    to int4 at load), as users get it."""
    with postgres_database() as database_url:
        yield from _session_server(tiny_model, tmp_path_factory, database_url)


def _session_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[Server]:
    srv = Server.start(
        tiny_model,
        tmp_path_factory.mktemp("lorafleet-home"),
        database_url=database_url,
        max_model_len="512",
        # a 2nd gateway attaches
        engine_port=str(free_port()),
        engine_api_key=secrets.token_urlsafe(16),
        metrics_port=str(free_port()),
        max_num_seqs="16",
        max_lora_rank=str(MAX_RANK),
        max_upload_bytes=str(MAX_UPLOAD),
        retry_after_s="3",
        rollout_tick_s="0.5",
        drift_look_s="1",
        drift_window="40",
        drift_max_samples="60",
        drift_reservoir="64",
        drift_replay_s="0",
        # as the direct-vLLM reference: "auto" would downcast to bf16 on CPU
        dtype="float32",
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis server on loopback (where several gateways keep their rate counters)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: `apt-get install redis-server` (.ci/run installs it)"
        )
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path_factory.mktemp("redis")),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class TenantHandle:
    name: str
    api_key: str
    url: str

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=120
        )

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0)


@pytest.fixture
def new_tenant(server: Server) -> Callable[[], TenantHandle]:
    """Factory: a fresh tenant with its API key, created through the admin API."""

    def create() -> TenantHandle:
        name = f"t-{uuid.uuid4().hex[:8]}"
        with server.admin() as admin:
            response = admin.post("/admin/tenants", json={"name": name})
        assert response.status_code == 201, response.text
        return TenantHandle(name=name, api_key=response.json()["api_key"], url=server.url)

    return create


# Fixtures that mean a test needs what `make unit` leaves out: the real engine, training on the
# tiny model, or a service of the OS that `make services` starts (the session's server keeps its
# catalog in PostgreSQL).
ENGINE_FIXTURES = {"server", "new_tenant"}
TRAINING_FIXTURES = {"tiny_model", "make_adapter", "vision_adapter", "world", "trained"}
POSTGRES_FIXTURES = {"server", "new_tenant", "postgres_catalog_template"}
REDIS_FIXTURES = {"redis_url"}


def pytest_collection_finish(session: pytest.Session) -> None:
    """What the collection imported (torch, the gateway's modules...) lives as long as the
    process: the garbage collector stops walking it in every full collection."""
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Nor as the process exits (a second or more once transformers' model code is imported)."""
    gc.freeze()


# `make unit` and `make test` run on two processes (pytest-xdist, --dist loadscope) that take the
# tests in these scopes: every test of the session's server is one (one worker runs them in their
# order, those that restart its engine last, so one engine serves them all); every other test that
# starts an engine or trains is another, for the other worker; the tests marked `heavy_imports` are
# a third (one worker imports transformers' model code, matplotlib and schemathesis, the other
# never); the other tests of the S3 server a fourth (one server starts); the rest go to either
# worker a file at a time (a module's fixtures are built once). The workers write the lists into the
# run's folder, where the scheduler reads them.
SCOPES = "xdist-scopes.json"


# Libraries that take seconds to import: a test imports them when it runs, never at collection,
# where every worker would pay for them before `make unit` deselects the tests that need them.
HEAVY_LIBRARIES = ("torch", "transformers", "vllm", "peft", "matplotlib", "schemathesis")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the fixtures they use (`make unit` deselects these marks); tests that kill
    the engine run last, so the rest share one warm engine."""
    imported = [name for name in HEAVY_LIBRARIES if name in sys.modules]
    if imported:
        raise pytest.UsageError(
            f"collecting the tests imported {', '.join(imported)}: import it inside the test or "
            "its fixture, not at the top of a test module"
        )
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & ENGINE_FIXTURES or item.get_closest_marker("engine_restart"):
            item.add_marker(pytest.mark.engine)
        if fixtures & TRAINING_FIXTURES:
            item.add_marker(pytest.mark.training)
        if fixtures & POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)
        if fixtures & REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)
    if hasattr(config, "workerinput"):
        scopes: dict[str, str] = {}
        for item in items:
            if set(getattr(item, "fixturenames", ())) & ENGINE_FIXTURES or item.get_closest_marker(
                "engine_restart"
            ):
                scopes[item.nodeid] = "session-server"
            elif item.get_closest_marker("engine") or item.get_closest_marker("training"):
                scopes[item.nodeid] = "engines-and-training"
            elif item.get_closest_marker("heavy_imports"):
                scopes[item.nodeid] = "heavy-imports"
            elif "s3_url" in getattr(item, "fixturenames", ()):
                scopes[item.nodeid] = "s3"  # one S3 server per run
        folder = run_folder(config, config._tmp_path_factory)  # type: ignore[attr-defined]
        written = folder / f"{SCOPES}.{os.getpid()}"
        written.write_text(json.dumps(scopes))
        written.replace(folder / SCOPES)  # whole, whichever worker writes it last


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist's scheduling by scopes (--dist loadscope), as `SCOPES` says."""
    from xdist.scheduler import LoadScopeScheduling

    if config.getoption("dist") != "loadscope":
        return None

    # pytest-xdist's own way to the run's folder, whose subfolders the workers get
    listed = config._tmp_path_factory.getbasetemp() / SCOPES  # type: ignore[attr-defined]

    class Scopes(LoadScopeScheduling):
        scopes: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.scopes is None:
                self.scopes = json.loads(listed.read_text())
            return self.scopes.get(nodeid) or nodeid.split("::", 1)[0]

    return Scopes(config, log)


def s3_environ(endpoint: str, home: Path) -> dict[str, str]:
    """The AWS settings boto3 reads itself, pointing it at a loopback S3 server (no profile or
    config file of the developer's applies)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
    }


@pytest.fixture(scope="session")
def s3_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-API server (moto's) on loopback with one bucket; yields
    `s3://lorafleet-test/<run>`. The AWS variables pointing boto3 at it are set for the whole
    process and its children (`clean_environ` strips only LORAFLEET_*; `LocalServer` passes the
    rest on)."""
    import sys

    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        with pytest.MonkeyPatch.context() as patch:
            # would override ours
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                patch.delenv(name, raising=False)
            for name, value in s3_environ(endpoint, tmp_path_factory.mktemp("aws")).items():
                patch.setenv(name, value)
            boto3.client("s3").create_bucket(Bucket="lorafleet-test")
            yield f"s3://lorafleet-test/run-{uuid.uuid4().hex[:8]}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def engine_nodes(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, s3_url: str
) -> Iterator[Nodes]:
    """Two `lorafleet engine` nodes on one S3 store, shared by the tests that put lorafleet's fleet
    or a pool in front of them (their engine starts are the longest part of those tests). A test
    that kills one brings it back before it ends."""
    nodes = start_nodes(tiny_model, tmp_path_factory, f"{s3_url}/nodes", secrets.token_urlsafe(12))
    try:
        yield nodes
    finally:
        for node in nodes.nodes.values():
            node.stop()
