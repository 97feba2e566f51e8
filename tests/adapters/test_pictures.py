"""Pictures are scaled down to a token budget, in the engine's command line and in the trainer's
processor alike; a base whose processor already keeps pictures small is left as it is."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorafleet.adapters.pictures import (
    DEFAULT_CONTEXT,
    DEFAULT_IMAGE_TOKENS,
    default_pictures,
    picture_budget,
    scale_pictures,
)
from lorafleet.serve.engine.command import engine_command
from lorafleet.serve.engine.hardware import Quantization
from lorafleet.serve.settings import Settings
from tests.factories import TINY_BASE_CONFIG

pytestmark = pytest.mark.heavy_imports  # transformers' processors

RELEASED_MAX_PIXELS = 12_845_056  # Qwen2.5-VL's released processor: 16,384 tokens a picture


@pytest.fixture(scope="module")
def released_size_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base folder with a Qwen2.5-VL config and its released image processor's bounds."""
    from transformers import Qwen2VLImageProcessor

    folder = tmp_path_factory.mktemp("released-processor")
    (folder / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))
    Qwen2VLImageProcessor(min_pixels=3136, max_pixels=RELEASED_MAX_PIXELS).save_pretrained(folder)
    return folder


def _mm_kwargs(settings: Settings) -> dict | None:
    cmd, _ = engine_command(settings, 8000, "token", False, Quantization("none"))
    if "--mm-processor-kwargs" not in cmd:
        return None
    return json.loads(cmd[cmd.index("--mm-processor-kwargs") + 1])


def test_the_server_and_the_trainer_default_to_the_same_budget():
    from lorafleet.train.config import TrainConfig

    server = Settings(base="x")
    trainer = TrainConfig(base="x", train="t.jsonl", out="o")
    assert (server.max_model_len, server.max_image_tokens) == (
        DEFAULT_CONTEXT,
        DEFAULT_IMAGE_TOKENS,
    )
    assert (trainer.max_length, trainer.max_image_tokens) == (DEFAULT_CONTEXT, DEFAULT_IMAGE_TOKENS)


def test_a_released_processor_is_held_to_the_budget(released_size_base):
    budget = picture_budget(str(released_size_base), DEFAULT_IMAGE_TOKENS, DEFAULT_CONTEXT)
    assert budget is not None and budget.scales_down
    assert (budget.tokens, budget.max_pixels) == (1024, 1024 * 28 * 28)
    assert budget.base_max_pixels == RELEASED_MAX_PIXELS
    # half of a shorter context, whatever the setting
    assert picture_budget(str(released_size_base), 4096, 1024).tokens == 512


def test_the_engine_is_told_the_budget_and_a_setting_moves_it(released_size_base):
    base = str(released_size_base)
    assert _mm_kwargs(Settings(base=base)) == {"max_pixels": 1024 * 784}
    assert _mm_kwargs(Settings(base=base, max_image_tokens=256)) == {"max_pixels": 256 * 784}
    # what the operator passes to vLLM comes last: it wins
    cmd, _ = engine_command(
        Settings(base=base, engine_extra_args=["--mm-processor-kwargs", '{"max_pixels": 1}']),
        8000,
        "token",
        False,
        Quantization("none"),
    )
    assert cmd[-1] == '{"max_pixels": 1}'


def test_a_processor_that_keeps_pictures_small_is_left_alone(untrained_base):
    # the tiny base's processor: at most 112x112 pixels, 16 tokens
    budget = default_pictures(str(untrained_base))
    assert budget is not None and not budget.scales_down and budget.tokens == 16
    assert _mm_kwargs(Settings(base=str(untrained_base))) is None


def test_a_base_without_a_pixel_sized_processor_has_no_budget(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))  # no processor at all
    assert picture_budget(str(tmp_path), DEFAULT_IMAGE_TOKENS, DEFAULT_CONTEXT) is None
    assert _mm_kwargs(Settings(base=str(tmp_path))) is None


def test_the_trainers_processor_scales_a_large_picture_to_the_budget(released_size_base):
    from PIL import Image
    from transformers import AutoImageProcessor

    picture = Image.new("RGB", (1280, 960), "white")
    # what scale_pictures reads of the trainer's AutoProcessor
    processor = SimpleNamespace(
        image_processor=AutoImageProcessor.from_pretrained(released_size_base)
    )
    tokens = processor.image_processor(images=[picture])["image_grid_thw"].prod().item() // 4
    assert tokens == (1288 // 28) * (952 // 28)  # 1,564: the released bound keeps it whole
    scale_pictures(processor, default_pictures(str(released_size_base)))
    scaled = processor.image_processor(images=[picture])["image_grid_thw"].prod().item() // 4
    assert 900 < scaled <= 1024
