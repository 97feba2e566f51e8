"""`python -m lorafleet.serve.cli` (e.g. under `accelerate launch` or `torchrun`)."""

from lorafleet.serve.cli import app

app()
