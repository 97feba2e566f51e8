"""OpenAI's Files and Batch APIs for each tenant's deployments.

- `lines`    a batch input file's request lines: read and checked at upload, each error naming its
             line
- `records`  files and batches in the catalog: create, find (a tenant's own only), cancel, claim
             under a lease, record finished lines, finish
- `results`  a finished batch's output and error files, in OpenAI's line shapes

The lines run through the chat path (`lorafleet.serve.api.batch_runner`), at a lower priority than
live requests (`lorafleet.serve.admission`).
"""
