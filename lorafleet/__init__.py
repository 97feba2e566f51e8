"""lorafleet: one quantized base VLM on vLLM, many tenants, hot-swapped LoRA adapters.

The distribution installs the repository's top-level folders under this one namespace:

    lorafleet.chat_jsonl, lorafleet.scoring   what the gateway and the trainer share:
                                        chat JSONL, task metrics
    lorafleet.adapters                  the registry: upload validation,
                                        content-addressed store, catalog
    lorafleet.serve                     the gateway: HTTP API, engine, rollouts, drift, CLI
                                        (folder serve/)
    lorafleet.train                     everything offline: trainer, evaluation, quantize,
                                        tiny model (train/)
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
