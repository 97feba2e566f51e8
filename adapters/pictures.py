"""How large a picture the engine and the trainer see.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors size a picture by its pixel count: one token per
(patch × merge)² pixels (28² for Qwen2.5-VL), up to their `size.longest_edge`. Their released
processors allow 12.8 megapixels, 16,384 tokens: eight times a 2,048-token context, so a phone
photo is refused as too long, and every token of a picture costs the engine's prefill (and the
trainer's step) time and memory. lorafleet scales pictures down to a token budget instead, in
serving and in training alike, so that an adapter learns at the resolution it is served at. Other
processors keep their own bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lorafleet.adapters.base_model import base_config

__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_IMAGE_TOKENS",
    "PictureBudget",
    "default_pictures",
    "picture_budget",
    "scale_pictures",
]

DEFAULT_CONTEXT = 2048  # the engine's max model length and the trainer's max length
# about 0.8 megapixels at Qwen2.5-VL's 28-pixel unit (1036x776 for a 4:3 picture), half of the
# default context: room left for the prompt's text and the answer
DEFAULT_IMAGE_TOKENS = 1024


@dataclass(frozen=True)
class PictureBudget:
    """The most tokens one picture becomes, and the processor's pixel bound that gives it."""

    tokens: int
    max_pixels: int  # tokens × (patch × merge)²
    base_max_pixels: int  # the base's own processor's bound

    @property
    def scales_down(self) -> bool:
        """Whether the budget is below what the base's processor allows (else nothing changes)."""
        return self.max_pixels < self.base_max_pixels

    def describe(self) -> str:
        return f"{self.tokens} tokens ({self.max_pixels / 1e6:.2f} megapixels) a picture"


def picture_budget(base: str, max_tokens: int, context: int) -> PictureBudget | None:
    """At most `max_tokens` a picture and at most half of `context` (the engine's max model length
    or the trainer's max length); None where the base's processor does not size pictures by their
    pixel count."""
    found = _pixel_processor(base)
    if found is None:
        return None
    unit, base_max_pixels = found
    tokens = min(max_tokens, context // 2, base_max_pixels // unit)
    return PictureBudget(tokens, min(base_max_pixels, tokens * unit), base_max_pixels)


def default_pictures(base: str) -> PictureBudget | None:
    """The budget of a server and a trainer whose settings are the defaults."""
    return picture_budget(base, DEFAULT_IMAGE_TOKENS, DEFAULT_CONTEXT)


def scale_pictures(processor: Any, budget: PictureBudget | None) -> None:
    """Make a loaded processor (transformers' `AutoProcessor`) scale pictures to the budget."""
    if budget is not None and budget.scales_down:
        image = processor.image_processor
        image.size = type(image.size)(**{**dict(image.size), "longest_edge": budget.max_pixels})


@lru_cache(maxsize=8)
def _pixel_processor(base: str) -> tuple[int, int] | None:
    """(pixels per token, the most pixels a picture keeps) of the base's image processor, if it
    sizes pictures by pixel count; None otherwise, or where the base has no image processor."""
    from transformers import AutoImageProcessor

    try:
        base_config(base)  # a hub id that is neither cached nor reachable fails here, at once
        image = AutoImageProcessor.from_pretrained(base)
    except (OSError, ValueError):
        return None
    patch, merge = getattr(image, "patch_size", None), getattr(image, "merge_size", None)
    longest = dict(getattr(image, "size", None) or {}).get("longest_edge")
    if not (isinstance(patch, int) and isinstance(merge, int) and isinstance(longest, int)):
        return None
    return (patch * merge) ** 2, longest
