"""The trainer end to end on the real stack: train, score against the base in vLLM, prove
servable."""

from __future__ import annotations

import json

import pytest

from lorafleet.chat_jsonl import load_jsonl, request_messages
from lorafleet.errors import InvalidAdapter, NotServable
from lorafleet.train.config import load_config
from lorafleet.train.pipeline import finish
from lorafleet.train.servable import prove_servable
from lorafleet.train.vllm_generate import generate

pytestmark = pytest.mark.engine  # every test here also proves its adapter servable in vLLM


def train(*args, **kwargs):
    """The trainer, imported when a test runs (torch stays out of the fast tier's collection)."""
    from lorafleet.train.trainer import train

    return train(*args, **kwargs)


def _config(world, out, **overrides):
    values = dict(
        base=str(world.base),
        train=world.file("json", "train"),
        val=world.file("json", "val"),
        probe=world.file("general", "val"),
        mix=world.file("general", "train"),
        out=out,
        rank=16,
        lr=2e-3,
        batch_size=16,
        epochs=2,
        eval_every=10,
        eval_max_tokens=24,
    )
    return load_config(None, **{**values, **overrides})


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    config = _config(world, tmp_path_factory.mktemp("json-adapter"))
    result = train(config, progress=False)
    manifest, report = finish(config, result)
    return config, result, manifest, report


def test_adapter_beats_the_base_on_its_task_and_keeps_the_probe(trained):
    _, _, _, report = trained
    val, probe = report.sets
    assert (val.name, probe.name) == ("validation", "probe")
    assert val.base <= 0.1 and val.adapter >= 0.9, report.to_dict()
    assert val.adapter_format == 1.0 and val.base_format <= 0.1  # valid JSON objects
    assert probe.base >= 0.9 and probe.base - probe.adapter <= 0.05
    assert report.verdicts() == []


def test_manifest_records_base_data_hyperparameters_and_checks(trained):
    config, result, manifest, _ = trained
    on_disk = json.loads((config.out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["base"]["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    assert (
        len(manifest["base"]["chat_template_sha256"]) == 64
        and manifest["base"]["image_processor"]["size"]
    )
    assert set(manifest["data_sha256"]) == {"train", "val", "probe", "mix"}
    assert (
        manifest["hyperparameters"]["rank"] == 16 and manifest["training"]["steps"] == result.steps
    )
    assert manifest["servability"]["changed"] >= 1 and "transformers" in manifest["versions"]
    # every validation of the run, and whether the loss had stopped falling
    training = manifest["training"]
    assert len(training["val_losses"]) >= 2 and training["converged"] == result.converged
    assert (training["advice"] is None) == (result.converged is not False)


def test_untrained_adapter_is_refused_before_any_generation(world, tmp_path):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from lorafleet.train.trainer import lora_config

    config = _config(world, tmp_path / "noop")
    model = AutoModelForImageTextToText.from_pretrained(world.base, dtype=torch.float32)
    # PEFT init: B = 0, a no-op
    get_peft_model(model, lora_config(config)).save_pretrained(config.out)
    # (a), the upload check, sees it
    with pytest.raises(InvalidAdapter, match="all lora_B weights are zero"):
        prove_servable(str(world.base), config.out, [], {"base": [], "adapter": []}, 8, max_rank=64)


def test_adapter_too_weak_to_change_an_answer_is_refused_as_a_silent_no_op(world, tmp_path):
    from lorafleet.train.random_adapter import make_random_adapter

    config = _config(world, tmp_path / "weak")
    # nonzero, yet answers like the base
    make_random_adapter(world.base, config.out, seed=0, rank=8, std=1e-6)
    prompts = [request_messages(e) for e in load_jsonl(config.val)[:4]]
    outputs = generate(
        str(world.base), {"base": None, "adapter": str(config.out)}, prompts, 8, max_rank=16
    )
    with pytest.raises(NotServable, match="silent no-op"):
        prove_servable(str(world.base), config.out, prompts, outputs, 8, max_rank=64)


def test_adapter_whose_names_miss_the_engine_layers_is_refused(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    config = trained[0]
    broken = shutil.copytree(
        config.out, tmp_path / "broken", ignore=shutil.ignore_patterns("checkpoint")
    )
    tensors = load_file(broken / "adapter_model.safetensors")
    save_file(
        {
            k.replace("language_model.layers", "language_model.blocks"): v
            for k, v in tensors.items()
        },
        broken / "adapter_model.safetensors",
    )
    with pytest.raises(InvalidAdapter, match="has no module"):
        prove_servable(config.base, broken, [], {"base": [], "adapter": []}, 8, max_rank=64)


def test_resume_continues_from_the_checkpoint(world, tmp_path):
    first = train(
        _config(world, tmp_path, max_steps=4, eval_every=4, val=None, probe=None, mix=None),
        progress=False,
    )
    second = train(
        _config(world, tmp_path, max_steps=8, eval_every=4, val=None, probe=None, mix=None),
        resume=True,
        progress=False,
    )
    assert (first.steps, first.resumed_from) == (4, 0)
    assert (second.steps, second.resumed_from) == (8, 4)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 8
    # no pickles anywhere
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))


def test_training_on_the_quantized_checkpoint_sees_the_weights_vllm_serves(world, tmp_path):
    """QLoRA on any machine: the trainer loads the int4 checkpoint as it is (torchao), trains
    LoRA on top, and the adapter is scored and proven servable in vLLM on that same checkpoint
    (PEFT and vLLM agree on it)."""
    from lorafleet.train.quantize import quantize

    quantized = quantize(str(world.base), tmp_path / "base-int4", "int4", 32).out
    config = _config(world, tmp_path / "adapter", base=quantized)
    result = train(config, progress=False)
    manifest, report = finish(config, result)
    val, _ = report.sets
    assert val.base <= 0.1 and val.adapter >= 0.9, report.to_dict()
    # vLLM on the int4 base = PEFT on the int4 base, and it changes
    assert manifest["servability"]["changed"] >= 1


def test_bitsandbytes_qlora_without_cuda_is_refused_with_the_way_out(world, tmp_path):
    from lorafleet.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="lorafleet quantize"):
        train(_config(world, tmp_path / "adapter", qlora="on"), progress=False)
