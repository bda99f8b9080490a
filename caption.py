"""Caption your own images. For the attention decoder, also save where it looked for each word.

    python caption.py --checkpoint runs/NAME/best.pt --image photo.jpg [more.jpg ...] [--beam-size 5]
    python caption.py --checkpoint runs/NAME/best.pt --folder photos/ --out overlays/

Decoding options are eval.py's: --beam-size, --max-len, --length-penalty, --block-ngram-repeat.

Prints one caption per image and saves one PNG per image: the image, then (attention decoder) one
panel per generated word with its attention map upsampled smoothly over the image, or (plain
decoder) the image under its caption. --out is a folder (default captions/), or a .png file when
there is one image. Images are read and resized exactly as in data preparation.
"""
import os

import numpy as np
import torch

from config import add_decoding_arguments, decoding_options
from datasets import Vocabulary, load_image
from models import caption_images, load_model
from utils import ArgumentParser, InputError, load_checkpoint, pick_device, run_cli
from visualize import DPI, caption_figure, save

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(args):
    if args.folder:
        if not os.path.isdir(args.folder):
            raise InputError(f"folder {args.folder} not found")
        paths = sorted(os.path.join(args.folder, f) for f in os.listdir(args.folder)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {args.folder}")
        return paths
    for path in args.image:
        if not os.path.isfile(path):
            raise InputError(f"image {path} not found")
    return args.image


def read(path, size):
    try:
        return load_image(path, size)
    except Exception as e:  # Pillow's many ways of saying "not an image"
        raise InputError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="image files")
    source.add_argument("--folder", help="caption every image in this folder")
    add_decoding_arguments(p, beam_size=5)
    p.add_argument("--out", default="captions", help="folder for the PNGs, or a .png file for one image")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    if args.beam_size < 1 or args.length_penalty < 0:
        p.error("--beam-size must be at least 1, --length-penalty at least 0")

    paths = image_paths(args)
    to_file = args.out.lower().endswith(".png")
    if to_file and len(paths) > 1:
        raise InputError(f"--out {args.out} is one file but there are {len(paths)} images: give a folder")
    ckpt = load_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    encoder, decoder = load_model(ckpt, device)
    vocab = Vocabulary(ckpt["word_map"])
    options = decoding_options(args, ckpt["config"], args.beam_size)
    images = [read(path, ckpt["image_size"]) for path in paths]  # every file checked before any output
    names, seen = [], {}
    for path in paths:  # photo.png, and photo_2.png for a second photo.* from another folder
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")

    for start in range(0, len(paths), 32):
        batch = torch.from_numpy(np.stack(images[start:start + 32])).to(device)
        captions = caption_images(encoder, decoder, vocab, batch, options)
        for path, caption, name in zip(paths[start:start + 32], captions, names[start:start + 32], strict=True):
            words = caption.words
            print(f"{path}: {' '.join(words)}")
            fig, panels = caption_figure(read(path, max(256, ckpt["image_size"])), words, caption.alphas)
            target = args.out if to_file else os.path.join(args.out, name)
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            save(fig, target, dpi=DPI, metadata={"Title": " ".join(words), "Description": f"{panels} panels"})
    print(f"saved {len(paths)} PNG(s) {'as ' + args.out if to_file else 'in ' + args.out + '/'}")


if __name__ == "__main__":
    run_cli(main)
