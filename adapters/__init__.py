"""The adapter registry: validate uploads, store them by digest, keep the catalog."""

import logging

from .base_model import BaseModelSpec, load_base_spec
from .catalog import Adapter, AdapterVersion, Deployment, Tenant, open_catalog
from .errors import (Conflict, InvalidAdapter, InvalidRequest, LorafleetError, NotFound, PayloadTooLarge,
                     ServiceUnavailable, Unauthorized)
from .store import AdapterStore, LocalStore, open_store
from .validate import ValidatedAdapter, validate_adapter_dir, validate_upload

__all__ = ["BaseModelSpec", "load_base_spec", "Adapter", "AdapterVersion", "Deployment", "Tenant", "open_catalog",
           "Conflict", "InvalidAdapter", "InvalidRequest", "LorafleetError", "NotFound", "PayloadTooLarge",
           "ServiceUnavailable", "Unauthorized", "AdapterStore", "LocalStore", "open_store", "ValidatedAdapter",
           "validate_adapter_dir", "validate_upload"]

# torchao 0.18 registers Enum types that torch 2.13 already handles, and torch warns twice at every import of
# torchao (quantize, train, the demo). Nothing a user can act on; every lorafleet entry point imports this package.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
