"""The adapter registry: validate uploads, store them by digest, keep the catalog."""

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
