"""The one settings object. Every value can be set as `LORAFLEET_<NAME>` in the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """lorafleet configuration; defaults run on a laptop (SQLite, local adapter store, one CPU
    engine)."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    home: Path = Path("~/.lorafleet")
    database_url: str = ""  # default: sqlite:///<home>/catalog.db
    # `serve` upgrades a catalog that is behind (SQLite: after a backup copy)
    catalog_auto_upgrade: bool = False
    store_url: str = ""  # default: file://<home>/adapters
    # an S3 store's local copies for the engine; default: <home>/cache/adapters
    store_cache_dir: Path | None = None
    store_cache_bytes: int = 20 * 1024**3  # their bound (least recently used go first)
    admin_key: SecretStr | None = None
    development: bool = False  # allows serving without an admin key
    # seals the web console's session cookies: gateways behind one address must share it; default:
    # derived from the admin key (rotating that signs everyone out); with neither, a random one per
    # process
    console_secret: SecretStr | None = None
    # a console sign-in lasts this long
    console_session_hours: float = Field(default=8.0, gt=0, le=24 * 30)

    # gateway
    host: str = "127.0.0.1"
    port: int = 8000
    # http(s) image URLs are accepted only if True (the gateway fetches them)
    allow_remote_images: bool = False
    # where remote images may come from: exact host names, "*.example.com" (its subdomains), "*"
    # (any host); whatever the list, a fetch only ever goes to public addresses (never loopback,
    # private, link-local...)
    remote_image_hosts: list[str] = Field(default_factory=lambda: ["*"])
    remote_image_timeout_s: float = 10.0  # one remote image's whole fetch, redirects included
    max_upload_bytes: int = 512 * 1024 * 1024
    retry_after_s: int = 5
    # uvicorn's line per request: a tenth of the gateway's CPU per request (metrics count all)
    access_log: bool = False
    # the chat path's key/deployment snapshots: another gateway's changes show after this
    catalog_cache_s: float = 1.0
    # any other request body (chat: JSON with data-URL images)
    max_request_bytes: int = 64 * 1024 * 1024
    # also serve /metrics, keyless, on metrics_host:metrics_port (the API port's needs a token)
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # a read-only bearer token for /metrics on the API port (for Prometheus)
    metrics_token: SecretStr | None = None

    # per-tenant limits: these defaults, changed per tenant by `PUT /admin/tenants/{name}/limits`;
    # 0: unlimited
    tenant_rpm: int = 6000  # chat requests per minute
    tenant_tpm: int = 2_000_000  # prompt + completion tokens per minute
    tenant_concurrency: int = 64  # chat requests in flight
    max_images_per_request: int = 8
    max_image_bytes: int = 10 * 1024 * 1024  # one image, decoded
    # one image, width x height (Qwen2.5-VL resizes above ~12.8 M anyway)
    max_image_pixels: int = 16_000_000
    tenant_max_adapters: int = 200  # adapter versions stored
    tenant_max_adapter_bytes: int = 20 * 1024**3  # their total size
    # where rate counters live: memory:// (this process) | redis://host:6379/0 (shared)
    limits_url: str = "memory://"
    # chat requests in the engine at once, shared fairly between tenants; 0: its batch size
    engine_slots: int = 0
    fair_queue_timeout_s: float = 60.0  # longest a request waits for an engine slot before a 503

    # rollouts
    # default: hostname + random suffix; names this process in leases and decisions
    gateway_id: str = ""
    rollout_tick_s: float = 5.0  # how often the controller reconciles active rollouts
    # a gateway that stops renewing loses its rollouts to another after this
    rollout_lease_s: float = 30.0

    # drift monitoring
    # how often sampled requests are saved and input/output drift is tested
    drift_look_s: float = 60.0
    # live requests sampled per deployment per look period (a uniform reservoir)
    drift_reservoir: int = 32
    drift_window: int = 100  # sampled requests per drift look (a tumbling window)
    drift_max_samples: int = 1000  # sampled requests kept per deployment; the oldest are deleted
    # scheduled validation replay of every live version; 0 turns it off
    drift_replay_s: float = 86400.0
    drift_alpha: float = 0.05  # false-alarm budget per monitored version over all its looks
    drift_permutations: int = 200  # MMD permutation test

    # the feedback loop (README "Feedback and retraining")
    # ask the engine for the answers' token log-probabilities (hidden unless asked)
    record_confidence: bool = True
    # how often the request log is written to the catalog
    request_log_flush_s: float = Field(default=1.0, gt=0)
    # a larger request is never captured (its images included)
    capture_max_request_bytes: int = 16 * 1024 * 1024

    # housekeeping (`lorafleet gc`, and periodically): retention in days, 0 keeps forever (so an
    # upgrade deletes nothing on its own) samples of rollouts finished longer ago (never an active
    # one's)
    retention_rollout_samples_days: float = 0.0
    # decisions of rollouts finished longer ago, and older `undo`-like ones
    retention_decisions_days: float = 0.0
    # older drift looks (each series keeps its newest, for its look count)
    retention_drift_checks_days: float = 0.0
    retention_validation_runs_days: float = 0.0  # older replays of kind "check" (never a baseline)
    # the request log (a new table: no earlier data is affected)
    retention_requests_days: float = 30.0
    # users' feedback (what retraining learns from); captures: per deployment
    retention_feedback_days: float = 0.0
    # how often the fleet collects garbage (one gateway per period); 0: never
    gc_interval_s: float = 3600.0
    # orphan blobs, temporary and scratch entries go once this old (uploads in flight)
    gc_temp_age_s: float = 86400.0

    # engine (vLLM OpenAI server on a private loopback port)
    base: str = ""  # hub id or local path of the base model
    # auto (the checkpoint's own, else int4) | none | int4 | int8 (torchao, at load) | fp8 (GPU)
    quantize: str = "auto"
    quantize_group_size: int = 32  # int4: one scale per this many input weights
    engine_port: int = 0  # 0: pick a free port
    # an engine already running (vLLM's OpenAI server with LoRA): attach to it, start none
    engine_url: str = ""
    # its bearer token (VLLM_API_KEY); if set, the supervised engine's too
    engine_api_key: SecretStr | None = None
    # this vLLM process finds adapters by digest in the store (an engine node)
    engine_resolver: bool = False
    engine_python: str = ""  # default: the gateway's own interpreter
    # the engine's CPU priority below the gateway's (its idle busy-polling; see command.py)
    engine_nice: int = 10
    # 0 below: derived at start from this machine and the deployed adapters
    # (lorafleet.serve.engine.sizing) highest adapter rank accepted and the engine's; 0: the largest
    # deployed, rounded up
    max_lora_rank: int = 0
    # uploads accepted up to this rank while max_lora_rank is derived
    UPLOAD_RANK_LIMIT: ClassVar[int] = 64
    # adapters in one batch; 0: as many as a batch can use, within a memory share
    max_loras: int = 0
    # adapters kept warm (vLLM's LRU); 0: every deployed adapter, with headroom
    max_cpu_loras: int = 0
    max_model_len: int = 2048
    max_num_seqs: int = 0  # sequences in one batch; 0: per device, within the KV cache
    dtype: str = "auto"
    # CPU engine's KV cache; 0: max_num_seqs full sequences, within a RAM share
    cpu_kvcache_gib: int = 0
    cpu_memory_fraction: float = 0.2  # vLLM's --gpu-memory-utilization means RAM share on CPU
    engine_start_timeout_s: float = 600.0
    engine_extra_args: list[str] = Field(default_factory=list)

    # fleet: several engines behind the gateway (README "Running a fleet"); the default is one
    # supervised engine engines this gateway starts and supervises (one per GPU)
    replicas: int = Field(default=1, ge=1, le=64)
    # engine nodes (`lorafleet engine`) to attach to instead: URLs, comma-separated; each host name
    # is resolved again every fleet_discovery_s and every address it has is a replica (a headless
    # Service names every pod)
    engines: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # | affinity | least_loaded | random (lorafleet.serve.fleet.placement)
    placement_policy: str = "bounded_affinity"
    # a replica takes requests below this x mean load
    placement_load_factor: float = Field(default=1.25, ge=1.0)
    # how often each replica's queue and adapters are read
    fleet_scrape_s: float = Field(default=1.0, gt=0)
    # how often the `engines` host names are resolved again
    fleet_discovery_s: float = Field(default=10.0, gt=0)

    @field_validator("engines", mode="before")
    @classmethod
    def _split_engines(cls, value: object) -> object:
        if isinstance(value, str):  # the environment's form: comma-separated (or a JSON list)
            if value.lstrip().startswith("["):
                import json

                return json.loads(value)
            return [url.strip() for url in value.split(",") if url.strip()]
        return value

    @field_validator("engines")
    @classmethod
    def _engine_urls(cls, urls: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"an engine is an http(s) URL such as http://engine-0:8100, not {url!r}"
                )
        return [url.rstrip("/") for url in urls]

    @field_validator("placement_policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        # fleet.placement.POLICIES
        policies = ("random", "least_loaded", "affinity", "bounded_affinity")
        if name not in policies:
            raise ValueError(f"unknown placement policy {name!r}; one of {', '.join(policies)}")
        return name

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()  # the engine and the store get absolute paths

    @field_validator("base")
    @classmethod
    def _local_base_absolute(cls, base: str) -> str:
        local = Path(base).expanduser()
        return str(local.resolve()) if base and local.exists() else base  # else a hub id

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'catalog.db'}"
        if not self.store_url:
            self.store_url = f"file://{self.home / 'adapters'}"
        if sum((self.replicas > 1, bool(self.engines), bool(self.engine_url))) > 1:
            raise ValueError(
                "choose one of replicas (engines this gateway starts), engines (engine nodes) and "
                "engine_url (one engine beside the gateway)"
            )
        return self

    @property
    def accepted_lora_rank(self) -> int:
        """The highest adapter rank an upload may have: max_lora_rank when set, else
        UPLOAD_RANK_LIMIT (a derived engine rank grows to what a deployment needs)."""
        return self.max_lora_rank or self.UPLOAD_RANK_LIMIT

    def require_admin_key(self) -> None:
        """Refuse to serve an admin API that anyone could call, outside development."""
        if self.admin_key is None and not self.development:
            raise ValueError(
                "LORAFLEET_ADMIN_KEY is not set: set it (any long random string), "
                "or set LORAFLEET_DEVELOPMENT=1 to serve without an admin API"
            )
