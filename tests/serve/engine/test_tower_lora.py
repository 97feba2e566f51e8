"""The copy of vLLM's tower and connector LoRA support in `lorafleet.adapters.base_model.TOWER_LORA`
checked against the installed vLLM."""

from __future__ import annotations

import importlib

import pytest

from lorafleet.adapters.base_model import TOWER_LORA

pytestmark = pytest.mark.heavy_imports  # vLLM, imported by the tests, not at collection


@pytest.mark.parametrize("architecture", sorted(TOWER_LORA))
def test_vllm_applies_lora_to_the_tower_and_connector_the_table_names(architecture):
    from vllm.model_executor.models.registry import _VLLM_MODELS

    module, name = _VLLM_MODELS[architecture]
    model = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)
    assert model.supports_tower_connector_lora
    keys = model.get_mm_mapping(None)  # the prefixes in vLLM's names
    tower, connectors = TOWER_LORA[architecture]

    def vllm_name(prefix: str) -> str:  # a module under a transformers prefix, as vLLM names it
        return model.hf_to_vllm_mapper._map_name(prefix + "layer")

    assert vllm_name(tower).startswith(tuple(keys.tower_model))
    for connector in connectors:
        assert vllm_name(connector).startswith(tuple(keys.connector))
    # every connector vLLM names is in the table
    assert len(connectors) == len(keys.connector)
