"""Image grids with captions: what a person looks at instead of reading numbers (reports, validation samples).

Every image gets its caption (a prompt, a seed, its scores) under it; a grid can carry a title (which model, which
step). Nearest-neighbour upscaling keeps small images (the toy worlds' 32 px) legible beside their text.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def captioned_grid(images: np.ndarray, captions: Sequence[str], cols: int, scale: int = 4, title: str | None = None):
    """(N, H, W, 3) uint8 images in rows of `cols`, each upscaled `scale` times with its caption (wrapped to the
    image's width; lines split at newlines) under it, and an optional title above; a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    h, w = images.shape[1] * scale, images.shape[2] * scale
    line_h = int(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2

    def wrap(text: str) -> list[str]:
        lines = []
        for part in text.split("\n"):
            line = ""
            for word in part.split():
                trial = f"{line} {word}".strip()
                if line and draw.textlength(trial, font=font) > w - 4:
                    lines.append(line)
                    line = word
                else:
                    line = trial
            lines.append(line)
        return lines

    wrapped = [wrap(c) for c in captions]
    band = line_h * max(len(x) for x in wrapped) + 4
    top = line_h + 6 if title else 0
    n_rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (w + 4), top + n_rows * (h + band)), "white")
    canvas = ImageDraw.Draw(grid)
    if title:
        canvas.text((4, 2), title, fill="black", font=font)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * (w + 4), top + (i // cols) * (h + band)
        grid.paste(Image.fromarray(np.kron(image, np.ones((scale, scale, 1), np.uint8))), (x, y))
        for j, line in enumerate(lines):
            canvas.text((x + 2, y + h + 2 + j * line_h), line, fill="black", font=font)
    return grid
