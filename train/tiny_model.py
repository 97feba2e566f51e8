"""A tiny but real Qwen2.5-VL, built locally: no hub download, same code paths as a real base.

Constraints of vLLM 0.32 on CPU: head_dim 64 for vLLM's CPU attention, mrope_section summing to
head_dim/2, an image AND a video processor, and the Qwen special tokens in the config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "build_tiny_model",
    "local_processor",
    "local_tokenizer",
    "pretrain",
    "save_base",
    "special_token_ids",
    "PRETRAIN_STEPS",
    "TINY_MIN_PIXELS",
    "TINY_MAX_PIXELS",
]

# told (step, steps, loss) after each pre-training step
Progress = Callable[[int, int, float], None]

TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112
_LOGIT_SCALE = 25.0
_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen's own template, reduced to text and images: the same rendering in training and serving.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "What is in the image? a red circle. a blue square. a green triangle. a yellow circle.",
    "What color is the object? What shape is it? red green blue yellow circle square triangle",
    "Quelle est la couleur ? Un mot. rouge, bleu, vert, jaune.",
    (
        'Describe the object as JSON. {"shape": "circle", "color": "red"} '
        '{"shape": "square", "color": "blue"}'
    ),
    '{"shape": "triangle", "color": "green"} {"shape": "circle", "color": "yellow"}',
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def local_tokenizer():
    """A byte-level BPE tokenizer with Qwen's special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=_SPECIAL[1:],
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def special_token_ids(tokenizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config's token ids for `tokenizer`: the text model's, and the image and video ones."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIAL}
    text = dict(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return text, vision


def _config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    text_ids, vision_ids = special_token_ids(tokenizer)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            # head_dim 64
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
            tie_word_embeddings=False,
            **text_ids,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=128,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        **vision_ids,
    )


def pretrain(
    model,
    processor,
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 5e-4,
    pool_size: int = 1200,
    progress: Progress | None = None,
) -> float:
    """Teach the whole tiny model the general shapes task, so it is a base with something to
    forget. Returns the last batch's loss; `progress(step, steps, loss)` is told after each step.
    (At 3e-3 the vision tower only ever learned colours, never shapes.)"""
    import random

    import torch

    from lorafleet.chat_jsonl import Example
    from lorafleet.train.data import collate, encode
    from lorafleet.train.shapes import BASE_TASKS, make_example

    rng = random.Random(f"pretrain-{seed}")
    torch.manual_seed(seed)
    pool = []  # encoded once: the processor, not the model, is the slow part on CPU
    for i in range(pool_size):
        if i % 4 == 3:  # text-only copying trains the output row of every token, as a real base has
            words = rng.choice(_CORPUS).split()
            start = rng.randrange(len(words))
            snippet = " ".join(words[start : start + rng.randint(2, 8)])
            messages: list[dict[str, Any]] = [
                {"role": "user", "content": f"Repeat: {snippet}"},
                {"role": "assistant", "content": snippet},
            ]
            pool.append(encode(processor, Example(messages, [], "pretrain"), max_length=512))
            continue
        image, question, answer = make_example(rng.choice(BASE_TASKS), rng)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "-"}},
                    {"type": "text", "text": question},
                ],
            },
            {"role": "assistant", "content": answer},
        ]
        pool.append(encode(processor, Example(messages, [image], "pretrain"), max_length=512))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = model(**collate(rng.sample(pool, batch_size), processor.tokenizer.pad_token_id)).loss
        loss.backward()
        for group in optimizer.param_groups:  # linear decay to 10%
            group["lr"] = lr * (1 - 0.9 * step / steps)
        optimizer.step()
        optimizer.zero_grad()
        if progress:
            progress(step + 1, steps, loss.item())
    model.eval()
    return loss.item()


# 48/48 exact match on held-out general-task images; ~2 minutes on 2 CPU cores
PRETRAIN_STEPS = 1000


def build_tiny_model(
    out: Path, seed: int = 0, pretrain_steps: int = 0, progress: Progress | None = None
) -> Path:
    """Write a tiny Qwen2.5-VL (weights, tokenizer, processor) to `out`: randomly initialised, then
    pre-trained for `pretrain_steps` on the general shapes task (`progress` as `pretrain`'s)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = local_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(_config(tokenizer))
    processor = local_processor(tokenizer, TINY_MIN_PIXELS, TINY_MAX_PIXELS)
    if pretrain_steps:
        pretrain(model, processor, pretrain_steps, seed, progress=progress)
    else:
        # random weights give near-uniform next-token odds, whose greedy ties any
        with torch.no_grad():
            # kernel's rounding flips; peaked logits decide clearly
            model.lm_head.weight.mul_(_LOGIT_SCALE)
    save_base(out, model, processor)
    return out


def local_processor(tokenizer, min_pixels: int, max_pixels: int):
    """Qwen2.5-VL's processor around `tokenizer`, images resized into [min, max] pixels."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=_CHAT_TEMPLATE,
    )


def save_base(out: Path, model, processor) -> None:
    """A base folder as a hub checkpoint has it: weights, config, processor, tokenizer."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
