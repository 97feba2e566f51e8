"""One module per catalog revision, oldest first.

- `0001_0_1_0_schema`           the 0.1.0 schema, as that release created it
- `0002_leases`                 leases for the work done once per fleet
- `0003_feedback_loop`          the request log, feedback and captures
- `0004_manifest_replay_start`  the trainer's manifest on adapter versions; when replays start
- `0005_version_parts`          the parts of the base each adapter version changes
- `0006_deployment_objective`   the InferenceObjective each deployment's requests name to a pool
- `0007_batches`                OpenAI's Files and Batch APIs: files, batches, their finished lines
- `0008_usage_budgets`          usage per tenant and day, budgets, per-tenant prices, per-request
                                images and engine times
"""
