"""The HTTP API of the gateway.

- `app`           `create_app(settings)`: routes, error handlers, upload limit, health and metrics
                  endpoints
- `dependencies`  request-scoped aliases: `GatewayDep`, `SessionDep`, `CurrentTenant`, `AdminKey`
- `errors`        every error rendered once, in OpenAI's `{"error": {...}}` shape
- `chat`          `/v1/chat/completions` (authenticate -> resolve -> assign -> load -> forward ->
                  record), `/v1/models`
- `forward`       the hop to the engine and back, without re-modelling the request
- `registry`      adapters and deployments; `rollouts` validation sets, answer formats, canaries,
                  A/B tests; `drift` replays, looks and sampling; `admin` tenants and the engine's
                  state
"""
