"""Training batches: chat JSONL examples (`lorafleet.chat_jsonl`) rendered by the base's own
processor.

Labels are -100 except on assistant turns.
"""

from __future__ import annotations

import copy

from PIL import Image

from lorafleet.chat_jsonl import Example, count_images
from lorafleet.errors import DataError

__all__ = ["encode", "collate"]

IGNORE = -100


def _ids(
    processor, messages: list[dict], images: list[Image.Image], generation_prompt: bool
) -> dict:
    # apply_chat_template rewrites image parts in place: render a copy, never the caller's messages
    text = processor.apply_chat_template(
        copy.deepcopy(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    return processor(text=[text], images=images or None, return_tensors="pt")


def encode(processor, example: Example, max_length: int) -> dict:
    """Token ids, labels (assistant tokens only), and image tensors of one example."""
    full = _ids(processor, example.messages, example.images, generation_prompt=False)
    input_ids = full["input_ids"][0]
    if len(input_ids) > max_length:
        raise DataError(example.source, f"{len(input_ids)} tokens, above max_length {max_length}")
    labels = input_ids.clone().fill_(IGNORE)
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        seen = count_images(example.messages[:i])
        prompt = _ids(
            processor, example.messages[:i], example.images[:seen], generation_prompt=True
        )
        answered = _ids(
            processor, example.messages[: i + 1], example.images[:seen], generation_prompt=False
        )
        start, end = prompt["input_ids"].shape[1], answered["input_ids"].shape[1]
        labels[start:end] = input_ids[start:end]  # the answer and its end-of-turn token
    item = {
        "input_ids": input_ids,
        "labels": labels,
        "mm_token_type_ids": full["mm_token_type_ids"][0],
    }
    if example.images:
        item["pixel_values"], item["image_grid_thw"] = full["pixel_values"], full["image_grid_thw"]
    return item


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad a batch; image patches of all examples are concatenated (Qwen2-VL's layout)."""
    import torch

    length = max(len(item["input_ids"]) for item in items)
    batch = {
        "input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(items), length), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
        # 1 marks image tokens
        "mm_token_type_ids": torch.zeros((len(items), length), dtype=torch.long),
    }
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        batch["input_ids"][row, :n] = item["input_ids"]
        batch["labels"][row, :n] = item["labels"]
        batch["attention_mask"][row, :n] = 1
        batch["mm_token_type_ids"][row, :n] = item["mm_token_type_ids"]
    with_images = [item for item in items if "pixel_values" in item]
    if with_images:
        batch["pixel_values"] = torch.cat([item["pixel_values"] for item in with_images])
        batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in with_images])
    return batch
