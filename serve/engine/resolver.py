"""The engine-side part of a fleet node: a vLLM LoRA resolver that finds adapters by digest in
lorafleet's store.

An engine node (a pod or host of its own) cannot read the gateway's folders. vLLM asks its
registered resolvers for an adapter name it does not know when runtime LoRA updating is on; this one
answers for content digests only: it fetches the blob from the adapter store (`LORAFLEET_STORE_URL`)
into the node's verified local cache (`LORAFLEET_STORE_CACHE_DIR`, bounded by
`LORAFLEET_STORE_CACHE_BYTES`) and hands vLLM that folder. A resolver rather than a sidecar or load
requests carrying a location: the engine fetches only what a request needs, the gateway never tells
an engine where to read (a digest cannot point anywhere else), and nothing else runs in the pod.
vLLM loads it as a general plugin (entry point `vllm.general_plugins`); it registers itself only
where `LORAFLEET_ENGINE_RESOLVER` is on, so the gateway-supervised engine, which the gateway loads
by path, is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from typing import cast

from lorafleet.adapters.store import AdapterStore, open_store
from lorafleet.serve.engine import loaded_adapters
from lorafleet.serve.engine.command import NODE_INFO_ENV, SERVED_BASE_NAME
from lorafleet.serve.settings import Settings

__all__ = ["StoreResolver", "register"]

log = logging.getLogger("lorafleet.engine.resolver")

_DIGEST = re.compile(r"[0-9a-f]{64}")


class StoreResolver:
    """vLLM `LoRAResolver`: adapter digest -> a local, verified copy from the store (None: not
    ours, or absent)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        from vllm.lora.request import LoRARequest

        if not _DIGEST.fullmatch(lora_name):
            return None  # a name, not a content digest: another resolver's, or nobody's
        if not await asyncio.to_thread(self.store.exists, lora_name):
            return None
        # checks every sha256 and the digest
        path = await asyncio.to_thread(self.store.fetch, lora_name)
        log.info("adapter %s fetched from the store into %s", lora_name[:12], path)
        # vLLM assigns the id
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))


def register() -> None:
    """vLLM's plugin hook (run in each vLLM process): register the store resolver where this node
    asks for it, and publish what the node is (`lorafleet_node_info` on vLLM's /metrics:
    hardware, quantization, sizing), which gateways read to describe and size it, and the
    residency of its adapters (`lorafleet.serve.engine.loaded_adapters`)."""
    settings = Settings()
    if not settings.engine_resolver:
        return
    _publish_node_info(os.environ.get(NODE_INFO_ENV, ""))
    loaded_adapters.register(SERVED_BASE_NAME)  # its adapters' residency, for an InferencePool
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    store = open_store(
        settings.store_url,
        settings.store_cache_dir or settings.home / "cache" / "adapters",
        settings.store_cache_bytes,
    )
    # a virtual subclass: vLLM's ABC, without importing vLLM at our import
    LoRAResolver.register(StoreResolver)
    LoRAResolverRegistry.register_resolver(
        "lorafleet store", cast(LoRAResolver, StoreResolver(store))
    )


def _publish_node_info(raw: str) -> None:
    from prometheus_client import Info

    try:
        info = {str(k): str(v) for k, v in json.loads(raw).items()} if raw else {}
    except (ValueError, AttributeError):
        log.warning("%s is not a JSON object; the node does not describe itself", NODE_INFO_ENV)
        return
    # registered already (the hook ran before in this process)
    with contextlib.suppress(ValueError):
        Info(
            "lorafleet_node", "What this lorafleet engine node is: hardware, quantization, sizing"
        ).info(info)
