"""The adapter registry: what is accepted, where it is kept, and the catalog.

- `validate`        `validate_upload`: an uploaded archive becomes a `ValidatedAdapter` or a typed
                    refusal
- `archive`         `unpack_archive`: bounded, streaming unpacking that refuses bombs and special
                    members
- `adapter_config`  `read_config`: every adapter_config.json field checked, regexes run under a
                    CPU limit
- `manifest`        the trainer's manifest.json uploaded beside an adapter: bounded read, digest
                    check, summary
- `names`           names of tenants, adapters and deployments (`check_name`, `Name`)
- `store`           the content-addressed adapter store (`open_store`) and `BlobStore` for
                    validation sets and captured images
- `s3_store`        the same two stores on S3-compatible storage (boto3), verified on fetch
- `adapter_cache`   an engine host's bounded, least-recently-used local copies of S3 adapters
- `catalog`         the SQLAlchemy tables: tenants, adapters, versions, deployments, rollouts,
                    drift, the request log (`open_catalog`)
- `migrate`         the catalog's schema revisions (Alembic scripts in `migrations/`):
                    `bring_to_head`, backups
- `leases`          work done once per fleet: a lease row per job, taken and renewed in the catalog
- `registry`        tenant-scoped catalog queries and writes (`resolve_version`, `set_deployment`)
- `tenants`         tenants, their keys (hashed), limits, deletion and the audit trail
- `garbage`         garbage collection: orphan blobs, temporary entries, history past retention
                    (`collect_garbage`)
- `base_model`      the base's LoRA-able layers, read from its config on the meta device
- `pictures`        how large a picture the engine and the trainer see: a token budget
                    (`picture_budget`) both scale pictures down to
- `quantization`    what a checkpoint's quantization is, and torchao configs to quantize at load
"""
