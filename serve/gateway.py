"""The gateway's long-lived parts, built once and wired explicitly: each gets exactly what it
uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.base_model import BaseModelSpec, load_base_spec
from lorafleet.adapters.catalog import open_catalog
from lorafleet.adapters.registry import deployed_digests, deployed_workload
from lorafleet.adapters.store import AdapterStore, BlobStorage, open_blob_store, open_store
from lorafleet.adapters.validate import upload_limit
from lorafleet.errors import UnsupportedQuantization
from lorafleet.serve.admission import FairQueue
from lorafleet.serve.drift.monitor import DriftMonitor
from lorafleet.serve.engine.command import tower_lora
from lorafleet.serve.engine.hardware import (
    Hardware,
    Quantization,
    detect_hardware,
    quantization_for,
)
from lorafleet.serve.engine.sizing import Workload, sizing_for
from lorafleet.serve.feedback.capture import Capturer
from lorafleet.serve.feedback.request_log import RequestLog
from lorafleet.serve.fleet.fleet import Fleet, open_fleet
from lorafleet.serve.garbage_collector import GarbageCollector
from lorafleet.serve.images import RemoteImages
from lorafleet.serve.limits import Limits, TenantLimiter
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.rollouts.reconciler import RolloutController, new_gateway_id
from lorafleet.serve.route_cache import RouteCache
from lorafleet.serve.settings import Settings
from lorafleet.serve.usage.budgets import BudgetCounters
from lorafleet.serve.usage.ledger import UsageLedger
from lorafleet.serve.usage.prices import Prices

__all__ = [
    "Gateway",
    "build_gateway",
    "open_stores",
    "open_capture_store",
    "open_file_store",
    "scratch_dir",
]


@dataclass(frozen=True)
class Gateway:
    """App-wide state of one gateway process."""

    settings: Settings
    sessions: sessionmaker
    store: AdapterStore
    validation_store: BlobStorage
    spec: BaseModelSpec
    metrics: Metrics
    fleet: Fleet  # the engine replicas (one by default), their supervision and placement
    controller: RolloutController
    drift: DriftMonitor
    gc: GarbageCollector
    route_cache: RouteCache  # the chat path's snapshots of keys and deployments
    limiter: TenantLimiter
    fair_queue: FairQueue
    remote_images: RemoteImages | None  # None: http(s) images are refused
    tmp_dir: Path
    request_log: RequestLog  # the request log's rows on their way to the catalog
    capturer: Capturer  # captured requests for retraining (deployments that opted in)
    capture_store: BlobStorage  # their images, content-addressed
    file_store: BlobStorage  # tenants' files (batch inputs and outputs), content-addressed
    usage: UsageLedger  # what requests used, on its way to the catalog
    budgets: BudgetCounters  # what budgeted tenants spent this period (shared counters)

    @property
    def max_upload_bytes(self) -> int:
        """An upload's limit: `LORAFLEET_MAX_UPLOAD_BYTES`, or derived from the base (0)."""
        return self.settings.max_upload_bytes or upload_limit(
            self.spec, self.settings.accepted_lora_rank
        )

    @property
    def tower_lora(self) -> bool:
        """Whether the engines apply LoRA to the base's vision tower and connector, so uploads
        may touch them."""
        return tower_lora(self.settings)


def _deployed(sessions: sessionmaker):
    async def deployed() -> set[str]:
        """Every adapter some deployment serves (registered on its replica after every engine
        start)."""

        def digests() -> set[str]:
            with sessions() as session:
                return deployed_digests(session)

        return await run_in_threadpool(digests)

    return deployed


def open_stores(settings: Settings) -> tuple[AdapterStore, BlobStorage]:
    """The adapter store and the validation-set store these settings name (one file:// folder or
    S3 prefix)."""
    store = open_store(
        settings.store_url,
        settings.store_cache_dir or settings.home / "cache" / "adapters",
        settings.store_cache_bytes,
    )
    return store, open_blob_store(
        settings.store_url, "validation", settings.home / "validation", ".jsonl"
    )


def open_capture_store(settings: Settings) -> BlobStorage:
    """Where captured requests' images are kept: `<home>/captures` beside a file:// store,
    `<prefix>/captures/` in an S3 one."""
    return open_blob_store(settings.store_url, "captures", settings.home / "captures", "")


def open_file_store(settings: Settings) -> BlobStorage:
    """Where tenants' files are kept (OpenAI's Files API): `<home>/files` beside a file:// store,
    `<prefix>/files/` in an S3 one."""
    return open_blob_store(settings.store_url, "files", settings.home / "files", ".jsonl")


def scratch_dir(settings: Settings) -> Path:
    """Where uploads are written and checked before they are stored (the garbage collector clears
    what is left)."""
    path = settings.home / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_gateway(settings: Settings) -> Gateway:
    """Every long-lived object of a gateway for these settings (the engine is started by the
    app's lifespan)."""
    if not settings.base:
        raise ValueError("no base model: pass --base (hub id or local path) or set LORAFLEET_BASE")
    spec = load_base_spec(settings.base)  # before anything is created: a base that is not there
    tower_lora(settings)  # LORAFLEET_TOWER_LORA=on for a base without it: ValueError, at once
    _private(settings.home)
    db, sessions = open_catalog(settings.database_url, upgrade=settings.catalog_auto_upgrade)
    tmp_dir = scratch_dir(settings)
    metrics = Metrics()
    event.listen(db, "checkout", lambda *_: metrics.catalog_connections.inc())
    event.listen(db, "checkin", lambda *_: metrics.catalog_connections.dec())
    hardware, quantization = _quantization(settings)
    metrics.engine.info(
        {"base": settings.base, "quantization": quantization.label, "hardware": hardware.describe()}
    )
    store, validation_store = open_stores(settings)
    with sessions() as session:  # the engine is sized for what the catalog serves
        workload = Workload(*deployed_workload(session))
    sizing = sizing_for(
        settings, hardware.gpu is not None, quantization.dtype or settings.dtype, workload
    )
    fleet = open_fleet(
        settings, store, metrics, hardware, quantization, sizing, _deployed(sessions)
    )
    # in rollout leases, decisions and the "gc" lease
    owner = settings.gateway_id or new_gateway_id()
    controller = RolloutController(
        sessions,
        fleet,
        validation_store,
        metrics,
        owner,
        settings.rollout_tick_s,
        settings.rollout_lease_s,
    )
    drift = DriftMonitor(sessions, fleet, validation_store, metrics, settings, quantization.label)
    fair_queue = FairQueue(
        lambda: settings.engine_slots or fleet.slots(),
        settings.fair_queue_timeout_s,
        settings.batch_share,
    )
    metrics.fair_queue_waiting.set_function(lambda: fair_queue.waiting)
    capture_store = open_capture_store(settings)
    limiter = TenantLimiter(settings.limits_url)
    return Gateway(
        settings=settings,
        sessions=sessions,
        store=store,
        validation_store=validation_store,
        spec=spec,
        metrics=metrics,
        fleet=fleet,
        controller=controller,
        drift=drift,
        gc=GarbageCollector(
            sessions, store, validation_store, [tmp_dir], settings, owner, metrics, capture_store
        ),
        route_cache=RouteCache(
            sessions, settings.catalog_cache_s, Limits.defaults(settings), Prices.defaults(settings)
        ),
        limiter=limiter,
        fair_queue=fair_queue,
        remote_images=RemoteImages.from_settings(settings),
        tmp_dir=tmp_dir,
        request_log=RequestLog(sessions, metrics, settings.request_log_flush_s),
        capturer=Capturer(sessions, capture_store, metrics, settings.capture_max_request_bytes),
        capture_store=capture_store,
        file_store=open_file_store(settings),
        usage=UsageLedger(sessions, metrics, settings.usage_flush_s),
        budgets=BudgetCounters(limiter.storage, sessions, metrics, settings.currency),
    )


def _quantization(settings: Settings) -> tuple[Hardware, Quantization]:
    """What the engine serves the base with. A gateway in front of engine nodes plans it on its
    own machine for the record only, and one that could not run it (fp8 on a CPU-only gateway
    host) is no error: the nodes run it (behind a pool too)."""
    try:
        return quantization_for(settings)
    except UnsupportedQuantization:
        if not (settings.engines or settings.pool_url):
            raise
        return detect_hardware(), Quantization(f"{settings.quantize} (planned on the engine nodes)")


def _private(home: Path) -> None:
    """The state folder (catalog, adapters, logs, keys' hashes) is its owner's alone; files made
    in it by this process are too (`lorafleet serve` sets the umask)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o700)
