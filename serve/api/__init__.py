"""The HTTP API of the gateway.

- `app`            `create_app(settings)`: routes, error handlers, the lifespan of the gateway's
                   parts, health and metrics endpoints
- `guard`          authentication and body limits, as middleware, before any route reads a byte
- `dependencies`   request-scoped aliases: `GatewayDep`, `SessionDep`, `CurrentTenant`, `AdminKey`
- `errors`         every error rendered once, in OpenAI's `{"error": {...}}` shape
- `chat`           `/v1/chat/completions` as its steps: admit -> read body -> resolve -> assign
                   -> wait for a slot -> forward -> record
- `forward`        the hop to the engine: placement, adapter load, failover, the relay back
- `chat_record`    `ChatRecord`: a chat request's bookkeeping, settled exactly once
- `responses`      `/v1/responses`: OpenAI's Responses API as the chat completion it means
- `models`         `/v1/models` (a tenant's deployments) and `/v1/tenant`
- `adapters`       adapters and deployments, with their schemas
- `rollouts`       validation sets, answer formats, canaries and A/B tests
- `drift`          replays, drift looks and sampling
- `feedback`       feedback on answers and the request log; `captures` captured requests
- `files`          OpenAI's Files API: a batch's request lines, checked at upload; its results
- `batches`        OpenAI's Batch API; `batch_runner` runs the fleet's batches through the chat
                   path, under leases, at a lower priority than live requests
- `usage`          the usage report (`/v1/usage`, JSON or CSV), tenants' prices and budgets
                   (admin key)
- `admin`          tenants, keys, limits, audit and the engines (admin key)
- `openapi`        the OpenAPI document as the routes really take it (`openapi_chat`: the chat
                   and the Responses bodies)
"""
