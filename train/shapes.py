"""A tiny but meaningful world for the demo and the tests: images of coloured shapes.

The base learns the general task ("What is in the image?" -> "a red circle"); tenants then want
other answer formats on the same images: JSON (`{"shape": "circle", "color": "red"}`) or one French
word ("rouge").
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLORS",
    "TASKS",
    "BASE_TASKS",
    "TENANT_TASKS",
    "draw",
    "make_example",
    "write_task",
]

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
}
FRENCH = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune"}
SIZE = 112  # the tiny processor's max_pixels is 112*112: one image = 16 tokens


def _general(shape: str, color: str) -> tuple[str, str]:
    return "What is in the image?", f"a {color} {shape}"


def _color(shape: str, color: str) -> tuple[str, str]:
    return "What color is the object?", color


def _shape(shape: str, color: str) -> tuple[str, str]:
    return "What shape is it?", shape


def _json(shape: str, color: str) -> tuple[str, str]:
    return "Describe the object as JSON.", json.dumps({"shape": shape, "color": color})


def _french(shape: str, color: str) -> tuple[str, str]:
    return "Quelle est la couleur ? Un mot.", FRENCH[color]


TASKS = {"general": _general, "color": _color, "shape": _shape, "json": _json, "french": _french}
BASE_TASKS = ("general", "color", "shape")  # what the tiny base is pre-trained to follow
TENANT_TASKS = ("json", "french")  # new answer formats that tenants' adapters learn


def draw(shape: str, color: str, rng: random.Random) -> Image.Image:
    """A shape of random size and place on a lightly tinted background."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    size = rng.randint(52, 92)
    x, y = rng.randint(4, SIZE - size - 4), rng.randint(4, SIZE - size - 4)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((x, y, x + size, y + size), fill=fill)
    elif shape == "square":
        pen.rectangle((x, y, x + size, y + size), fill=fill)
    else:
        pen.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    return image


def make_example(task: str, rng: random.Random) -> tuple[Image.Image, str, str]:
    """(image, question, answer) for one random object."""
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    question, answer = TASKS[task](shape, color)
    return draw(shape, color, rng), question, answer


def write_task(task: str, n: int, out: Path, seed: int) -> Path:
    """Write `n` examples as chat JSONL, images as PNG files beside it (relative paths)."""
    out = Path(out)
    images = out.parent / f"{out.stem}-images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{task}-{seed}")
    with open(out, "w") as f:
        for i in range(n):
            image, question, answer = make_example(task, rng)
            image.save(images / f"{i:05d}.png")
            user = [
                {"type": "image_url", "image_url": {"url": f"{images.name}/{i:05d}.png"}},
                {"type": "text", "text": question},
            ]
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": user},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
                + "\n"
            )
    return out
