"""Pretrain the shapes demo's small encoder on a dense task the generator labels for free: every
pixel's colour, shape and size (background included), predicted from the encoder's grid features.

ImageNet weights cannot be downloaded everywhere, and random ResNet features hardly know shapes or
places. This writes a plain ResNet state_dict that `encoder_weights: PATH` loads, the same way a
downloaded ImageNet file is used; training then keeps the encoder frozen and caches its features.

    python pretrain_encoder.py --output-folder data/shapes            # -> data/shapes/encoder_resnet18_stages2.pt
    python pretrain_encoder.py --output-folder data/shapes --steps 300 --encoder resnet34
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import shapes
from encoder import Encoder
from utils import ArgumentParser, InputError, atomic_path, grid_side, run_cli

TASKS = {"colour": len(shapes.COLOURS), "shape": len(shapes.SHAPES), "size": len(shapes.SIZES)}


def batch(seed, start, size, image_size):
    """Scenes start .. start+size-1 of an endless stream: uint8 images and per-pixel labels."""
    images, labels = [], []
    for i in range(start, start + size):
        scene = shapes.make_scene(shapes.scene_seed(seed, i), image_size)
        image, objmap = shapes.render(scene)
        images.append(image.transpose(2, 0, 1))
        labels.append(np.stack(shapes.pixel_labels(scene, objmap)))  # colour, shape, size; 0 = background
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


class DenseHeads(nn.Module):
    """One linear classifier per grid cell and task; logits upsampled to every pixel."""

    def __init__(self, dim):
        super().__init__()
        self.heads = nn.ModuleDict({task: nn.Linear(dim, n + 1) for task, n in TASKS.items()})

    def forward(self, features, image_size):
        grid = grid_side(features.size(1))
        out = {}
        for task, head in self.heads.items():
            logits = head(features).transpose(1, 2).reshape(features.size(0), -1, grid, grid)
            out[task] = F.interpolate(logits, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return out


def loss_and_accuracy(logits, labels):
    """Mean per-pixel cross-entropy over the three tasks; accuracy per task on object pixels."""
    loss, acc = 0.0, {}
    on_object = labels[:, 0] > 0
    for k, task in enumerate(TASKS):
        loss = loss + F.cross_entropy(logits[task], labels[:, k])
        right = logits[task].argmax(1) == labels[:, k]
        acc[task] = float(right[on_object].float().mean())
        acc[f"{task}_all_pixels"] = float(right.float().mean())
    return loss / len(TASKS), acc


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-folder", required=True)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--encoded-size", type=int, default=8, help="grid the task is learnt on")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=400, help="optimiser steps (at most)")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long as well (0: no limit)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1000, help="scene stream (the dataset uses another seed)")
    p.add_argument("--out", help="file name (default encoder_{encoder}_stages{stages}.pt)")
    args = p.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.image_size < 32:
        p.error("--steps and --batch-size must be at least 1, --image-size at least 32")
    if not os.path.isdir(args.output_folder):
        raise InputError(f"output folder {args.output_folder} not found")
    out = os.path.join(args.output_folder, args.out or f"encoder_{args.encoder}_stages{args.stages}.pt")

    torch.manual_seed(args.seed)
    encoder = Encoder(args.encoder, "none", args.encoded_size, args.stages)
    for param in encoder.parameters():  # the whole trunk learns, stem included
        param.requires_grad = True
    heads = DenseHeads(encoder.dim)
    opt = torch.optim.Adam(list(encoder.parameters()) + list(heads.parameters()), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    held_out = batch(args.seed + 1, 0, 256, args.image_size)  # other scenes than the training stream

    def evaluate():
        encoder.eval()
        with torch.no_grad():
            images, labels = held_out
            return loss_and_accuracy(heads(encoder(images), args.image_size), labels)

    first_loss, _ = evaluate()
    t0, step = time.time(), 0
    encoder.train()
    while step < args.steps and not (args.seconds and time.time() - t0 > args.seconds):
        images, labels = batch(args.seed, step * args.batch_size, args.batch_size, args.image_size)
        loss, acc = loss_and_accuracy(heads(encoder(images), args.image_size), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}, object-pixel accuracy "
                  + ", ".join(f"{t} {acc[t]:.1%}" for t in TASKS) + f" ({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    last_loss, acc = evaluate()
    with atomic_path(out) as tmp:
        torch.save(encoder.net.state_dict(), tmp)  # named like torchvision's ResNet
    report = {"weights": out, "encoder": args.encoder, "stages": args.stages, "encoded_size": args.encoded_size,
              "image_size": args.image_size, "steps": step, "batch_size": args.batch_size, "seconds": seconds,
              "held_out_loss_before": float(first_loss), "held_out_loss_after": float(last_loss),
              "held_out_accuracy": acc}
    with atomic_path(os.path.splitext(out)[0] + ".json") as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    print(f"pretrained {args.encoder} (stages 1-{args.stages}) for {step} steps in {seconds:.0f} s: held-out loss "
          f"{first_loss:.3f} -> {last_loss:.3f}; per-pixel accuracy on objects "
          + ", ".join(f"{t} {acc[t]:.1%}" for t in TASKS) + "; all pixels "
          + ", ".join(f"{t} {acc[t + '_all_pixels']:.1%}" for t in TASKS))
    print(f"saved {out}: use it with --encoder_weights {out}")


if __name__ == "__main__":
    run_cli(main)
