"""lorafleet: one quantized base VLM on vLLM, many tenants, hot-swapped LoRA adapters.

The distribution installs the repository's top-level folders under this one namespace
(`lorafleet.X.Y` lives at `X/Y.py`):

- `adapters/`    the registry: upload validation, content-addressed stores, the catalog (folder
                 adapters/)
- `serve/`       the gateway: HTTP API, engine, fleet, rollouts, drift, feedback, console, CLI
- `train/`       everything offline: trainer, evaluation, quantize, the tiny model
- `errors`       lorafleet's error tree, every error it raises on purpose
- `chat_jsonl`   the chat JSONL format the gateway and the trainer share (OpenAI chat messages)
- `scoring`      task metrics, the same for training, validation gates and drift replays

Layers: `adapters` and `train` never import `serve`; the gateway never imports `train`.
"""

import logging
from importlib import metadata

try:
    __version__ = metadata.version("lorafleet")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

# torchao 0.18 registers Enum types that torch 2.13 already handles, and torch warns twice at every
# import of torchao (quantize, train, the demo). Nothing a user can act on; every lorafleet entry
# point imports this package.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
