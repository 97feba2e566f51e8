"""The feedback loop: from live answers and users' judgements to a training set.

- `request_log`  every chat request's id, route, tokens, status, latency and confidence, written
                 in batches
- `confidence`   the answer's mean and least token log-probability, from the engine's logprobs
- `records`      users' feedback on answers (by request id, per tenant, idempotent) and its
                 summaries per variant
- `capture`      opted-in capture of whole live requests (images in the store), bounded, with
                 retention
- `export`       captures (and their feedback) as the trainer's chat JSONL
- `traffic`      a deployment's recent requests, errors and latency percentiles
                 (`GET .../traffic`)
- `schemas`      the API schemas this package builds (feedback, requests, captures, traffic)
"""
