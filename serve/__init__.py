"""The gateway and everything at request time or on a timer.

- `api/`         the HTTP API (FastAPI app, dependencies, error mapping, one module of routes per
                 resource)
- `engine/`      the vLLM engine: supervisor, command line and placement, sizing, hardware and
                 quantization, client
- `rollouts/`    canary rollouts and A/B tests: routing, state machine, statistics, gate, controller
- `fleet/`       placement of requests on engine replicas (adapter affinity with bounded loads)
- `drift/`       drift statistics, the monitor, the HTML report
- `cli/`         the `lorafleet` command, one module per command group
- `dev/`         the demo and a local test server (development only)
- `gateway`      `build_gateway`: every long-lived part, wired once; `settings` the one settings
                 object; `metrics` Prometheus; `route_cache` the chat path's catalog snapshots;
                 `validation` validation sets and the one replay-and-score path; `answer_format`
                 declared answer formats; `images` a chat request's images, found, limited and
                 inlined; `housekeeping` the periodic garbage collector; `client` the HTTP client of
                 this API (CLI, demo, tests)
"""
