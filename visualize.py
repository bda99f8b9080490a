"""Every picture the repository draws: attention overlays (caption.py, compare.py), the report's plots
(curves, metrics, self-critical training) and the attention maps as bytes for the HTML pages.
matplotlib, written to files; no screen needed."""
import base64
import math

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from skimage.transform import resize  # noqa: E402

from utils import atomic_path, grid_side  # noqa: E402

PANEL_PX, DPI = 200, 100  # caption.py: every panel PANEL_PX square


def overlay(ax, image, amap, word):
    """The image with one word's attention map (grid cells) upsampled smoothly over it."""
    grid = grid_side(amap.numel())
    smooth = resize(amap.reshape(grid, grid).numpy(), image.shape[:2], order=3, mode="edge")
    ax.imshow(image)
    ax.imshow(np.clip(smooth, 0, None), alpha=0.6, cmap="Greys_r")
    ax.set_title(word, fontsize=10)
    ax.axis("off")


def attention_from_bytes(text, grid):
    """results.attention_bytes() back to words x P maps (float tensor), each scaled to a peak of 1."""
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


def label_axes(fig, path, axes):
    """Title, axis labels, grid and legend for each (ax, title, ylabel, xlabel); then save the figure."""
    for ax, title, ylabel, xlabel in axes:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path, dpi=100)


def band(ax, label, series, style="-", **kw):
    """One line: a single series as it is; several (a group's seeds) as their mean at the x values they
    share, in a band from their minimum to their maximum. series: per run a list of (x, y)."""
    series = [s for s in series if s]
    if len(series) == 1:
        ax.plot(*zip(*series[0], strict=True), style, label=label, **kw)
    elif series:
        shared = sorted(set.intersection(*({x for x, _ in s} for s in series)))
        ys = np.array([[dict(s)[x] for x in shared] for s in series])  # seeds x shared points
        (line,) = ax.plot(shared, ys.mean(axis=0), style, label=f"{label}: mean, min to max", **kw)
        ax.fill_between(shared, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)


def training_curves(groups, path):
    """compare.py's curves.png. groups: (label, per run [(step, training loss)], per run [(epoch, val loss,
    val BLEU-4)]); a group of several runs is drawn as its mean with a band."""
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, steps, epochs in groups:
        band(ax1, label, steps, lw=1)
        band(ax2, label, [[(e, loss) for e, loss, _ in run] for run in epochs], "o-")
        band(ax3, label, [[(e, bleu) for e, _, bleu in run] for run in epochs], "o-")
    label_axes(fig, path, ((ax1, "training loss", "loss (mean since the previous point)", "optimiser step"),
                           (ax2, "validation loss", "cross-entropy per word", "epoch"),
                           (ax3, "validation BLEU-4", "BLEU-4 (decoded)", "epoch")))


def metric_bars(labels, names, values, title, path, errors=None):
    """compare.py's metrics.png: one group of bars per metric (`names`), one bar per run or group
    (`labels`); values[run][metric] are fractions (CIDEr already divided by 10), None as 0; errors, the
    same shape, draws a group's standard deviation over its seeds (None: no bar)."""
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 4.5))
    width = 0.8 / len(labels)
    errors = errors or [[None] * len(names) for _ in labels]
    for i, (label, row, err) in enumerate(zip(labels, values, errors, strict=True)):
        xs = [x + i * width for x in range(len(names))]
        ax.bar(xs, [v or 0 for v in row], width, label=label)
        if any(e is not None for e in err):
            ax.errorbar(xs, [v or 0 for v in row], yerr=[e or 0 for e in err], fmt="none", ecolor="black", capsize=2,
                        lw=1)
    ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(names))])
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score (fractions; CIDEr divided by 10)")
    ax.set_title(title)
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=8, loc="upper left", ncol=len(labels))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, path, dpi=100)


def scst_curves(runs, path):
    """compare.py's scst_curves.png. runs: (label, [(step, reward, sample length)], [(training seconds,
    validation CIDEr-D)])."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, steps, epochs in runs:
        step, reward, length = zip(*steps, strict=True)
        axes[0].plot(step, reward, label=label, lw=1)
        axes[1].plot(step, length, label=label, lw=1)
        axes[2].plot(*zip(*epochs, strict=True), "o-", label=label)
    label_axes(fig, path, ((axes[0], "mean reward of the samples", "CIDEr-D", "optimiser step"),
                           (axes[1], "sample length", "words", "optimiser step"),
                           (axes[2], "validation CIDEr-D (greedy)", "CIDEr-D", "training time (s)")))


def attention_curves(runs, path):
    """compare.py's attention_curves.png: how each attention run's training went. runs: (label,
    [(training seconds, validation CIDEr-D)], [(step, attention gradient variance)], [(step, entropy of
    alpha per word)])."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, cider, variance, entropy in runs:
        if cider:
            axes[0].plot(*zip(*cider, strict=True), "o-", label=label)
        if variance:
            axes[1].semilogy(*zip(*variance, strict=True), label=label, lw=1)
        if entropy:
            axes[2].plot(*zip(*entropy, strict=True), label=label, lw=1)
    label_axes(fig, path, ((axes[0], "validation CIDEr-D (decoded)", "CIDEr-D", "training time (s)"),
                           (axes[1], "variance of the attention's gradient", "mean variance per parameter",
                            "optimiser step"),
                           (axes[2], "entropy of alpha in training", "nats per word", "optimiser step")))


def image_strip(images, titles, path):
    """The images (3 x H x W uint8) side by side, titled: compare.py's errors.png."""
    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.6), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles, strict=True):
        ax.imshow(image.transpose(1, 2, 0))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save(fig, path, dpi=100)


def save(fig, path, **kw):
    """Write a figure as PNG under a temporary name, rename it into place, and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **kw)
    plt.close(fig)
