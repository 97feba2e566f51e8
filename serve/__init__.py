"""The gateway and everything at request time or on a timer.

- `api/`                the HTTP API: the app, the guard, the chat path, routes and schemas per
                        resource
- `engine/`             the vLLM engine: supervisor, command line, sizing, hardware and
                        quantization, the gateway's client of it
- `fleet/`              engine replicas and placement of requests on them (adapter affinity with
                        bounded loads)
- `rollouts/`           canary rollouts and A/B tests: routing, phases, state machine,
                        statistics, gate, controller
- `drift/`              drift statistics, the monitor, the feedback timeline, the HTML report
- `feedback/`           the feedback loop: request log, feedback, confidence, capture, export
- `batches/`            OpenAI's Files and Batch APIs: input lines, files and batches in the
                        catalog, output and error files
- `usage/`              usage per tenant and day, its prices and cost, budgets across gateways,
                        the usage report
- `console/`            the web console (server-rendered pages over the gateway's own API)
- `cli/`                the `lorafleet` command, one module per command group
- `dev/`                the demo and a local test server (development only)
- `gateway`             `build_gateway`: every long-lived part, wired once
- `settings`            the one settings object (`LORAFLEET_*`)
- `types`               the values the API and the domain packages share (`Route`, `Answer`)
- `route_cache`         the chat path's snapshots of keys and deployments
- `limits`              per-tenant rate, token and concurrency limits and their counters
- `admission`           the fair queue: engine slots shared max-min fairly between tenants
- `images`              a chat request's images: found, limited, fetched safely, inlined
- `validation`          validation sets and the one replay-and-score path
- `answer_format`       declared answer formats, checked with a time bound
- `metrics`             the Prometheus metrics, with bounded labels
- `garbage_collector`   the periodic garbage collection, once per fleet under a lease
- `gateway_client`      the HTTP client of this API (the CLI, the demo, tests)
"""
