"""Attention overlays and report plots (matplotlib, written to files; no screen needed)."""
import base64
import math

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from skimage.transform import resize  # noqa: E402

from utils import atomic_path  # noqa: E402

PANEL_PX, DPI = 200, 100  # caption.py: every panel PANEL_PX square


def overlay(ax, image, amap, word):
    """The image with one word's attention map (grid cells) upsampled smoothly over it."""
    grid = int(round(amap.numel() ** 0.5))
    smooth = resize(amap.reshape(grid, grid).numpy(), image.shape[:2], order=3, mode="edge")
    ax.imshow(image)
    ax.imshow(np.clip(smooth, 0, None), alpha=0.6, cmap="Greys_r")
    ax.set_title(word, fontsize=10)
    ax.axis("off")


def attention_bytes(alphas):
    """Per-word attention maps (words x P) as base64 text of uint8 values, each map scaled so that its
    largest weight is 255: how the HTML pages keep maps small. overlay() normalises each smoothed map
    to its own range, and so does the pages' script, so the scale is all that is dropped."""
    maps = np.asarray(alphas, dtype=np.float64)
    peak = np.maximum(maps.max(axis=1, keepdims=True), 1e-12)
    return base64.b64encode(np.rint(maps / peak * 255).astype(np.uint8).tobytes()).decode("ascii")


def attention_from_bytes(text, grid):
    """attention_bytes() back to words x P maps (float tensor), each scaled to a peak of 1."""
    raw = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    return raw.view(-1, grid * grid).float() / 255


def wrap(text, width=32):
    lines, line = [], ""
    for w in text.split():
        if line and len(line) + len(w) > width:
            lines.append(line)
            line = ""
        line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def caption_figure(image, words, alphas, columns=6):
    """caption.py's picture: the image, then one panel per word (attention), or the image under its
    caption (plain decoder). image: 3 x H x W uint8; alphas: len(words) x P, or None. Returns the
    figure and its number of panels."""
    panels = 1 + (len(words) if alphas is not None else 0)
    cols, rows = min(panels, columns), math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_PX / DPI, rows * PANEL_PX / DPI), dpi=DPI,
                             squeeze=False)
    picture = image.transpose(1, 2, 0)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(picture)
    if alphas is None:
        axes[0, 0].set_title(wrap(" ".join(words)), fontsize=8)
    else:
        for k, word in enumerate(words):
            overlay(axes.flat[k + 1], picture, alphas[k], word)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9 if alphas is None else 0.92, wspace=0.05)
    return fig, panels


def attention_grid(rows, path, max_words=24):
    """One row per image: the image (titled), then one panel per word. rows: (image, title, words,
    alphas) with image 3 x H x W uint8 and alphas len(words) x P."""
    cols = 1 + min(max_words, max(len(words) for _, _, words, _ in rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 1.3, len(rows) * 1.6), squeeze=False)
    for r, (image, title, words, alphas) in enumerate(rows):
        picture = image.transpose(1, 2, 0)
        for ax in axes[r]:
            ax.axis("off")
        axes[r, 0].imshow(picture)
        axes[r, 0].set_title(title, fontsize=8)
        for k, word in enumerate(words[:max_words]):
            overlay(axes[r, k + 1], picture, alphas[k], word)
            axes[r, k + 1].title.set_fontsize(8)
    fig.tight_layout()
    save(fig, path, dpi=72)  # dozens of noisy overlays: keep the file small


def save(fig, path, **kw):
    """Write a figure as PNG under a temporary name, rename it into place, and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **kw)
    plt.close(fig)
