"""The one settings object. Every value can be set as `LORAFLEET_<NAME>` in the environment."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "ObjectiveName", "check_objective_name"]


# an InferenceObjective's name: a Kubernetes object's (RFC 1123 subdomain)
OBJECTIVE_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


def check_objective_name(value: str) -> str:
    """The name of an InferenceObjective a pool's requests may name (the settings' and each
    deployment's): lowercase letters, digits, '-' and '.', starting and ending with a letter or
    digit, at most 253."""
    if not OBJECTIVE_PATTERN.match(value):
        raise ValueError(
            f"invalid objective {value!r}: an InferenceObjective's name is 1-253 lowercase "
            "letters, digits, '-' or '.', starting and ending with a letter or digit"
        )
    return value


ObjectiveName = Annotated[str, AfterValidator(check_objective_name)]


class Settings(BaseSettings):
    """lorafleet configuration; defaults run on a laptop (SQLite, local adapter store, one CPU
    engine)."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    # state and backends
    home: Path = Field(
        default=Path("~/.lorafleet"),
        description="The state folder: catalog, adapter store, logs, scratch. It is made readable "
        "by its owner only (mode 700) at every start.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL of the catalog; empty: `sqlite:///<home>/catalog.db`. "
        "`postgresql+psycopg://USER:PASSWORD@HOST:5432/DB` (or `postgresql://`, which means "
        "psycopg 3) for a catalog that several gateways share.",
    )
    catalog_auto_upgrade: bool = Field(
        default=False,
        description="`serve` upgrades a catalog that is behind this release (as `serve --upgrade` "
        "does; SQLite after a backup copy); else it refuses to start on one, naming "
        "`lorafleet db upgrade`.",
    )
    store_url: str = Field(
        default="",
        description="The content-addressed adapter and validation-set store; empty: "
        "`file://<home>/adapters`. `s3://bucket/prefix` for any S3-compatible service (endpoint "
        "and keys from `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ... or `~/.aws/config`).",
    )
    store_cache_dir: Path | None = Field(
        default=None,
        description="With an S3 store: the engine host's verified local copies of adapters; "
        "unset: `<home>/cache/adapters`.",
    )
    store_cache_bytes: int = Field(
        default=20 * 1024**3,
        description="The bound of those local copies: the least recently used are evicted past "
        "it (never one that is loading).",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="Bearer key of the admin API; it also reads `/metrics`. `serve` refuses to "
        "start without it unless `LORAFLEET_DEVELOPMENT=1`.",
    )
    development: bool = Field(
        default=False, description="Allows serving without an admin key (development only)."
    )
    console_secret: SecretStr | None = Field(
        default=None,
        description="What seals the web console's session cookies: gateways behind one address "
        "must share it. Unset: derived from the admin key (rotating that signs everyone out); "
        "with neither, a random one per process.",
    )
    console_session_hours: float = Field(
        default=8.0, gt=0, le=24 * 30, description="How long a console sign-in lasts (hours)."
    )

    # gateway
    host: str = Field(default="127.0.0.1", description="The gateway's address (or `--host`).")
    port: int = Field(default=8000, description="The gateway's port (or `--port`).")
    allow_remote_images: bool = Field(
        default=False,
        description="Accept http(s) image URLs: the gateway fetches them itself, from public "
        "addresses only, and inlines them. Data URLs always work; other schemes never.",
    )
    remote_image_hosts: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Hosts remote images may come from: exact host names, `*.example.com` (its "
        "subdomains), `*` (any host). Whatever the list, a fetch only ever goes to public "
        "addresses (never loopback, private, link-local...).",
    )
    remote_image_timeout_s: float = Field(
        default=10.0, description="One remote image's whole fetch, redirects included (seconds)."
    )
    max_upload_bytes: int = Field(
        default=0,
        description="An adapter upload's limit (archive and unpacked size); 0: derived, a float32 "
        "adapter of the highest accepted rank on every LoRA-able layer of the base and a quarter "
        "more, at least 512 MiB.",
    )
    retry_after_s: int = Field(default=5, description="`Retry-After` on a 503 (seconds).")
    access_log: bool = Field(
        default=False,
        description="uvicorn's access line per request. It costs a tenth of the gateway's CPU "
        "per request; the request metrics count every request without it.",
    )
    catalog_cache_s: float = Field(
        default=1.0,
        description="The chat path's snapshot of a key's tenant and a deployment's route: changes "
        "made through another gateway show after this (this gateway's own, at once).",
    )
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        description="Any other request body (chat: JSON with data-URL images); chunked bodies "
        "are counted as they arrive.",
    )
    max_file_bytes: int = Field(
        default=200 * 1024 * 1024,
        description="An uploaded file (`POST /v1/files`: a batch's request lines); each of its "
        "lines at most `max_request_bytes`.",
    )
    batch_share: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="The share of the engine slots batch lines may hold while live traffic "
        "goes on (at least one); they take a slot only when no live request waits for one, and "
        "every slot once no live request has come for 2 s. Higher: batches finish sooner, live "
        "requests slow down more (loadtests/bench_batches.py).",
    )
    batch_concurrency: int = Field(
        default=16,
        ge=1,
        description="Lines of one batch in the chat path at once on this gateway (the fair "
        "queue decides when each reaches the engine).",
    )
    batch_tick_s: float = Field(
        default=1.0,
        gt=0,
        description="How often a gateway looks for batches to run, renews its leases and writes "
        "progress (seconds).",
    )
    batch_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A batch whose gateway stopped renewing its lease this long is taken over "
        "by another (seconds); finished lines are never run again.",
    )
    metrics_port: int = Field(
        default=0,
        description="Also serve `/metrics`, without a key, on a listener of its own at "
        "`metrics_host:metrics_port`; 0: none (the API port's `/metrics` needs a token).",
    )
    metrics_host: str = Field(default="127.0.0.1", description="That listener's address.")
    metrics_token: SecretStr | None = Field(
        default=None,
        description="A read-only bearer token for `/metrics` on the API port (for Prometheus's "
        "`authorization` setting; the admin key reads it too).",
    )

    # per-tenant limits: these defaults, changed per tenant by `PUT /admin/tenants/{name}/limits`;
    # 0: unlimited
    tenant_rpm: int = Field(
        default=6000, description="Default per-tenant chat requests per minute (0: unlimited)."
    )
    tenant_tpm: int = Field(
        default=2_000_000,
        description="Default per-tenant prompt + completion tokens per minute (0: unlimited).",
    )
    tenant_concurrency: int = Field(
        default=64, description="Default per-tenant chat requests in flight (0: unlimited)."
    )
    max_images_per_request: int = Field(
        default=8, description="Default per-tenant images in one request (0: unlimited)."
    )
    max_image_bytes: int = Field(
        default=10 * 1024 * 1024,
        description="Default per-tenant bytes of one image, decoded (0: unlimited).",
    )
    max_image_pixels: int = Field(
        default=16_000_000,
        description="Default per-tenant pixels of one image, width x height, read from its header "
        "(Qwen2.5-VL resizes above about 12.8 M anyway; 0: unlimited).",
    )
    tenant_max_adapters: int = Field(
        default=200, description="Default per-tenant adapter versions stored (0: unlimited)."
    )
    tenant_max_adapter_bytes: int = Field(
        default=20 * 1024**3,
        description="Default per-tenant bytes of the adapter versions stored (0: unlimited).",
    )
    tenant_max_files: int = Field(
        default=500,
        description="Default per-tenant files stored (uploaded batch inputs and batch outputs; "
        "0: unlimited).",
    )
    tenant_max_batches: int = Field(
        default=10,
        description="Default per-tenant batches not yet finished (validating, in progress, "
        "finalizing, cancelling; 0: unlimited).",
    )
    tenant_max_batch_lines: int = Field(
        default=50_000,
        description="Default per-tenant request lines in one batch's input file (0: unlimited).",
    )
    limits_url: str = Field(
        default="memory://",
        description="Where rate, concurrency and budget counters live: `memory://` (this "
        "process), or `redis://host:6379/0` shared by every gateway.",
    )

    # usage and what it costs: these prices, changed per tenant by
    # `PUT /admin/tenants/{name}/prices`; budgets are per tenant only
    price_prompt_per_million: float = Field(
        default=0.0, ge=0, description="The price of a million prompt tokens."
    )
    price_completion_per_million: float = Field(
        default=0.0, ge=0, description="The price of a million completion tokens."
    )
    price_per_image: float = Field(default=0.0, ge=0, description="The price of one image.")
    price_per_engine_hour: float = Field(
        default=0.0,
        ge=0,
        description="The price of an hour of the engine's prefill and decode time (as the "
        "engine reports it per request).",
    )
    currency: str = Field(
        default="USD",
        min_length=1,
        max_length=8,
        description="The currency of the prices and budgets (a label: nothing is converted).",
    )
    usage_flush_s: float = Field(
        default=1.0,
        gt=0,
        description="How often a gateway writes the usage it counted to the catalog (seconds): a "
        "gateway killed outright loses at most this much of its usage.",
    )
    engine_slots: int = Field(
        default=0,
        description="Chat requests in the engine at once, shared fairly between tenants (the fair "
        "queue's slots); 0: the engine's batch size.",
    )
    fair_queue_timeout_s: float = Field(
        default=60.0,
        description="The longest a request waits for an engine slot before a 503 (seconds).",
    )

    # rollouts
    gateway_id: str = Field(
        default="",
        description="Names this gateway in leases and decisions; empty: the host name and a "
        "random suffix.",
    )
    rollout_tick_s: float = Field(
        default=5.0, description="How often the controller reconciles active rollouts (seconds)."
    )
    rollout_lease_s: float = Field(
        default=30.0,
        description="The lease a gateway holds on a rollout: a gateway that stops renewing loses "
        "its rollouts to another after this (seconds).",
    )

    # drift monitoring
    drift_look_s: float = Field(
        default=60.0,
        description="How often sampled requests are saved and input/output drift is tested "
        "(seconds).",
    )
    drift_reservoir: int = Field(
        default=32,
        description="Live requests sampled per deployment per look period (a uniform reservoir).",
    )
    drift_window: int = Field(
        default=100, description="Sampled requests per drift look (a tumbling window)."
    )
    drift_max_samples: int = Field(
        default=1000,
        description="Sampled requests kept per deployment; the oldest are deleted.",
    )
    drift_replay_s: float = Field(
        default=86400.0,
        description="Scheduled validation replay of every live version (seconds); 0 turns it off "
        "(baselines then come from `lorafleet drift check`).",
    )
    drift_alpha: float = Field(
        default=0.05,
        description="The false-alarm budget per monitored version over all its looks.",
    )
    drift_permutations: int = Field(default=200, description="The MMD permutation test's rounds.")

    # the feedback loop
    record_confidence: bool = Field(
        default=True,
        description="Ask the engine for every answer's token log-probabilities (hidden from "
        "clients that did not ask) and record its confidence.",
    )
    request_log_flush_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the request log's buffered rows are written to the catalog "
        "(seconds).",
    )
    capture_max_request_bytes: int = Field(
        default=16 * 1024 * 1024,
        description="A larger request (its images included) is never captured.",
    )

    # garbage collection (`lorafleet gc`, and periodically): retention in days, 0 keeps forever (so
    # an upgrade deletes nothing on its own)
    retention_rollout_samples_days: float = Field(
        default=0.0,
        description="Samples of rollouts finished longer ago (never an active one's) are deleted "
        "(days; 0: kept forever).",
    )
    retention_decisions_days: float = Field(
        default=0.0,
        description="Decisions of rollouts finished longer ago, and older `undo`-like ones, are "
        "deleted (days; 0: kept forever).",
    )
    retention_drift_checks_days: float = Field(
        default=0.0,
        description="Older drift looks are deleted; each series keeps its newest, for its look "
        "count (days; 0: kept forever).",
    )
    retention_validation_runs_days: float = Field(
        default=0.0,
        description="Older replays of kind `check` are deleted, never a baseline (days; 0: kept "
        "forever).",
    )
    retention_requests_days: float = Field(
        default=30.0, description="Older request-log rows are deleted (days; 0: kept forever)."
    )
    retention_usage_days: float = Field(
        default=0.0,
        description="Older days of the usage report are deleted (days; 0: kept forever).",
    )
    retention_feedback_days: float = Field(
        default=0.0,
        description="Older users' feedback (what retraining learns from) is deleted (days; 0: "
        "kept forever). Captures follow each deployment's own `retention_days`.",
    )
    gc_interval_s: float = Field(
        default=3600.0,
        description="How often the fleet collects garbage (one gateway per period); 0: never.",
    )
    gc_temp_age_s: float = Field(
        default=86400.0,
        description="Orphan blobs, temporary and scratch entries go once this old, so that "
        "uploads in flight keep theirs (seconds).",
    )

    # engine (vLLM OpenAI server on a private loopback port)
    base: str = Field(
        default="",
        description="The base model (or `--base`): a hub id or a local path, full precision or "
        "quantized.",
    )
    quantize: str = Field(
        default="auto",
        description="`auto` (the checkpoint's own quantization, else int4) | `none` | `int4` | "
        "`int8` (torchao, at load) | `fp8` (GPU); or `--quantize`.",
    )
    quantize_group_size: int = Field(
        default=32, description="int4 at load: weights per scale (or `--group-size`)."
    )
    engine_port: int = Field(
        default=0, description="The supervised engine's loopback port; 0: a free port."
    )
    engine_url: str = Field(
        default="",
        description="An engine already running (vLLM's OpenAI server started with "
        "`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`): attach to it, start none.",
    )
    engine_api_key: SecretStr | None = Field(
        default=None,
        description="That engine's bearer token (`VLLM_API_KEY`); if set, the supervised "
        "engine's too. An engine node (`lorafleet engine`) refuses to start without it.",
    )
    engine_resolver: bool = Field(
        default=False,
        description="This vLLM process finds adapters by digest in the store (an engine node; "
        "`lorafleet engine` sets it).",
    )
    engine_fixes: bool = Field(
        default=True,
        description="lorafleet's fixes to vLLM, applied in its engines where the vLLM version is "
        "the one they were made for: adapter lookup in one step (vLLM copied every adapter in "
        "memory each step), one series of `vllm:lora_requests_info` (vLLM kept one per adapter "
        "combination forever); off: vLLM as released.",
    )
    engine_python: str = Field(
        default="",
        description="The interpreter that runs vLLM (e.g. a CUDA vLLM venv on a GPU box); empty: "
        "the gateway's own.",
    )
    engine_nice: int = Field(
        default=10,
        description="The engine's CPU priority below the gateway's, for its idle busy-polling "
        "(0: the same).",
    )
    # 0 below: derived at start from this machine and the deployed adapters
    # (lorafleet.serve.engine.sizing)
    max_lora_rank: int = Field(
        default=0,
        description="The engine's `--max-lora-rank` and the highest adapter rank accepted; 0: "
        "derived, the largest deployed rounded up (uploads are accepted up to rank 64 then).",
    )
    # uploads accepted up to this rank while max_lora_rank is derived
    UPLOAD_RANK_LIMIT: ClassVar[int] = 64
    tower_lora: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="LoRA on the vision tower and connector (vLLM's "
        "`--enable-tower-connector-lora`, for the bases whose vLLM model supports it: Qwen2-VL, "
        "Qwen2.5-VL, Qwen3-VL, LLaVA, "
        "LLaVA-NeXT, Gemma 3, PaliGemma). `auto`: the engine runs with it whenever the base "
        "supports it; `on`: the same, and a base without support refuses to start; `off`: never, "
        "and an upload that touches the tower or connector is refused (400).",
    )
    max_loras: int = Field(
        default=0,
        description="Adapters in one batch; 0: derived, as many as a batch can use, within a "
        "memory share.",
    )
    max_cpu_loras: int = Field(
        default=0,
        description="Adapters kept in memory (vLLM's LRU; one that left it is read from disk "
        "again); 0: derived, as many as 10% of RAM holds at the engine's max rank.",
    )
    # the trainer's max_length and max_image_tokens default to these two values too
    # (lorafleet.adapters.pictures; tests/adapters/test_pictures.py keeps them equal)
    max_model_len: int = Field(default=2048, description="The engine's context length.")
    max_image_tokens: int = Field(
        default=1024,
        ge=1,
        description="The most tokens one picture becomes in the engine (and at most half of "
        "max_model_len): larger pictures are scaled down to it, for bases whose processor sizes "
        "pictures by pixels (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: 1024 tokens is 0.8 megapixels). The "
        "trainer's `--max-image-tokens` takes the same default, so adapters learn at the "
        "resolution they are served at.",
    )
    max_num_seqs: int = Field(
        default=0,
        description="Sequences in one batch; 0: derived, per device, within the KV cache.",
    )
    dtype: str = Field(
        default="auto",
        description="The engine's dtype (on CPU vLLM downcasts float32 checkpoints to bfloat16 "
        "under `auto`).",
    )
    cpu_kvcache_gib: int = Field(
        default=0,
        description="The CPU engine's KV cache (GiB); 0: derived, `max_num_seqs` full sequences "
        "within a RAM share.",
    )
    cpu_memory_fraction: float = Field(
        default=0.2,
        description="The CPU engine's RAM share (vLLM's `--gpu-memory-utilization` means a RAM "
        "share on CPU).",
    )
    engine_start_timeout_s: float = Field(
        default=600.0,
        description="A start fails when the engine does not answer within this (seconds).",
    )
    engine_extra_args: list[str] = Field(
        default_factory=list, description="A JSON list of extra vLLM arguments."
    )
    tool_call_parser: str = Field(
        default="auto",
        description="vLLM's tool-call parser, which lets tenants call tools (OpenAI's `tools` and "
        "`tool_choice`): `auto` picks the one for the base's model family where vLLM has one "
        "(`hermes` for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, `llama3_json` for Llama 3.2 Vision, "
        "`mistral` for Mistral 3 and Pixtral), `none` turns tool calling off, any other value is "
        "passed to vLLM as it is.",
    )

    # fleet: several engines behind the gateway; the default is one supervised engine
    replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Engines this gateway starts and supervises (or `--replicas`; one per GPU).",
    )
    engines: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Engine nodes (`lorafleet engine`) to route over instead (or `--engine`, "
        "repeatable): comma-separated URLs. Each host name is resolved again every "
        "`fleet_discovery_s` and every address it has is a replica (a headless Service names "
        "every pod).",
    )
    placement_policy: str = Field(
        default="bounded_affinity",
        description="Which replica serves an adapter: `bounded_affinity` | `affinity` | "
        "`least_loaded` | `random` (lorafleet.serve.fleet.placement).",
    )
    placement_load_factor: float = Field(
        default=1.25,
        ge=1.0,
        description="A replica takes an adapter's requests below this x the fleet's mean load.",
    )
    fleet_scrape_s: float = Field(
        default=1.0,
        gt=0,
        description="How often each replica's queue and adapters are read from its `/metrics` and "
        "`/v1/models` (seconds).",
    )
    stray_adapter_idle_s: float = Field(
        default=60.0,
        ge=0,
        description="A copy of an adapter on a replica that is not its home (it came while the "
        "home was down or full) is unloaded once idle this long there, if the home replica is up "
        "and holds the adapter (seconds).",
    )
    fleet_discovery_s: float = Field(
        default=10.0,
        gt=0,
        description="How often the `engines` host names are resolved again (seconds).",
    )
    pool_url: str = Field(
        default="",
        description="An upstream that places requests itself, instead of lorafleet's own engines "
        "(or `--pool`): the address of an llm-d / Gateway API Inference Extension "
        "`InferencePool`'s gateway, in front of `lorafleet engine` pods. lorafleet sends it every "
        "chat request and replay with `model` = the adapter's digest (the pods' resolver loads it) "
        "and the tenant and objective headers, and does no placement, scraping or loading of its "
        "own. Its bearer token is `engine_api_key`.",
    )
    pool_objective: str = Field(
        default="",
        description="The `InferenceObjective` named in the headers of live requests to the pool, "
        "for deployments the admin gave none of their own; empty: no objective header (the "
        "pool's default priority).",
    )
    pool_replay_objective: str = Field(
        default="",
        description="The `InferenceObjective` of the replays sent to the pool (validation gate, "
        "A/B evaluation, drift); empty: `pool_objective`.",
    )

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

    @field_validator("pool_url")
    @classmethod
    def _pool_url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if url and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(
                f"the pool is an http(s) URL such as http://inference-gateway, not {url!r}"
            )
        return url.rstrip("/")

    @field_validator("pool_objective", "pool_replay_objective")
    @classmethod
    def _objective_name(cls, name: str) -> str:
        return check_objective_name(name) if name else name

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
        sources = (
            self.replicas > 1,
            bool(self.engines),
            bool(self.engine_url),
            bool(self.pool_url),
        )
        if sum(sources) > 1:
            raise ValueError(
                "choose one of replicas (engines this gateway starts), engines (engine nodes), "
                "engine_url (one engine beside the gateway) and pool_url (an InferencePool that "
                "places requests itself)"
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
