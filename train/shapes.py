"""A tiny but meaningful world for the demo and the tests: images of coloured shapes.

The base learns the general task ("What is in the image?" -> "a red circle"); tenants then want
other answer formats on the same images: JSON (`{"shape": "circle", "color": "red"}`) or one French
word ("rouge"). Two lessons of fine-tuning are told here too (`LESSON_TASKS`): a visual property the
base's vision tower never learned (a shape's stripes, whose mean colour is the plain shape's), and a
multiple-choice question answered with the option's text or with its letter.
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
    "LESSON_TASKS",
    "LESSON_TASK_NAMES",
    "OPTIONS",
    "LETTERS",
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

LETTERS = dict(zip(COLORS, "ABCD"))  # each colour's option letter
OPTIONS = " ".join(f"{letter}) {color}" for color, letter in LETTERS.items())


def _color_option(shape: str, color: str) -> tuple[str, str]:
    return f"Which color is the object? {OPTIONS}", color


def _color_letter(shape: str, color: str) -> tuple[str, str]:
    return f"Which color is the object? {OPTIONS} Answer with the letter.", LETTERS[color]


# "texture": is the object striped or plain (a question about pixels the base never had to see);
# "color_option" answers a multiple-choice question with the option's text, "color_letter" with
# its letter
LESSON_TASKS = {"color_option": _color_option, "color_letter": _color_letter}
LESSON_TASK_NAMES = ("texture", *LESSON_TASKS)
_QUESTIONS = {**TASKS, **LESSON_TASKS}  # every task but texture, whose image differs too


STRIPE_PX = 2  # rows of each stripe
STRIPE_CONTRAST = 60  # each stripe this much above or below the fill: the same mean colour


def draw(shape: str, color: str, rng: random.Random, striped: bool = False) -> Image.Image:
    """A shape of random size and place on a lightly tinted background; `striped`: in horizontal
    stripes, lighter and darker by turns, of the same mean colour as the plain fill."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    size = rng.randint(52, 92)
    x, y = rng.randint(4, SIZE - size - 4), rng.randint(4, SIZE - size - 4)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    mask = Image.new("L", (SIZE, SIZE), 0)
    pen = ImageDraw.Draw(mask)
    if shape == "circle":
        pen.ellipse((x, y, x + size, y + size), fill=255)
    elif shape == "square":
        pen.rectangle((x, y, x + size, y + size), fill=255)
    else:
        pen.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=255)
    paint = Image.new("RGB", (SIZE, SIZE), fill)
    if striped:
        stripes = ImageDraw.Draw(paint)
        # per channel, as far up as down (never clipped): the mean stays the fill's
        step = [min(STRIPE_CONTRAST, c, 255 - c) for c in fill]
        for row in range(0, SIZE, STRIPE_PX):
            sign = 1 if (row // STRIPE_PX) % 2 else -1
            shade = tuple(c + sign * d for c, d in zip(fill, step))
            stripes.rectangle((0, row, SIZE, row + STRIPE_PX - 1), fill=shade)
    image.paste(paint, mask=mask)
    return image


def make_example(task: str, rng: random.Random) -> tuple[Image.Image, str, str]:
    """(image, question, answer) for one random object."""
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    if task == "texture":
        striped = rng.random() < 0.5
        answer = "striped" if striped else "plain"
        return draw(shape, color, rng, striped), "Is the object striped or plain?", answer
    question, answer = _QUESTIONS[task](shape, color)
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
