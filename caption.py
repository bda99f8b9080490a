"""Caption your own images. For the attention decoder, also save where it looked for each word.

    python caption.py --checkpoint runs/NAME/best.pt --image photo.jpg [more.jpg ...] [--beam-size 5]
    python caption.py --checkpoint runs/NAME/best.pt --folder photos/ --out overlays/

Decoding options are eval.py's: --beam-size, --max-len, --length-penalty, --block-ngram-repeat.

Prints one caption per image and saves one PNG per image: the image, then (attention decoder) one
panel per generated word with its attention map upsampled smoothly over the image, or (plain
decoder) the image under its caption. --out is a folder (default captions/), or a .png file when
there is one image. --html PAGE also writes one self-contained page of every image and its caption,
where hovering over a word (or stepping through the words with the arrow keys) shows its attention
map. Images are read and resized exactly as in data preparation.
"""
import os

import htmlpage
from captioner import Captioner
from config import add_decoding_arguments
from datasets import load_image
from utils import ArgumentParser, InputError, atomic_path, run_cli
from visualize import DPI, attention_bytes, caption_figure, save

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


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="image files")
    source.add_argument("--folder", help="caption every image in this folder")
    add_decoding_arguments(p, beam_size=5)
    p.add_argument("--out", default="captions", help="folder for the PNGs, or a .png file for one image")
    p.add_argument("--html", metavar="PAGE", help="also write this self-contained HTML page (say captions.html)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    if args.beam_size < 1 or args.length_penalty < 0:
        p.error("--beam-size must be at least 1, --length-penalty at least 0")

    paths = image_paths(args)
    to_file = args.out.lower().endswith(".png")
    if to_file and len(paths) > 1:
        raise InputError(f"--out {args.out} is one file but there are {len(paths)} images: give a folder")
    if args.html and os.path.isdir(args.html):
        raise InputError(f"--html {args.html} is a folder: give the page's file name, say {args.html}/captions.html")
    captioner = Captioner(args.checkpoint, args.device)
    names, seen = [], {}
    for path in paths:  # photo.png, and photo_2.png for a second photo.* from another folder
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    # every file is read before any output is written
    captions = captioner.caption(paths, args.beam_size, args.max_len, args.length_penalty, args.block_ngram_repeat)
    rows = []
    for path, caption, name in zip(paths, captions, names, strict=True):
        print(f"{path}: {' '.join(caption.words)}")
        shown = load_image(path, max(256, captioner.image_size))
        fig, panels = caption_figure(shown, caption.words, caption.alphas)
        target = args.out if to_file else os.path.join(args.out, name)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        save(fig, target, dpi=DPI, metadata={"Title": " ".join(caption.words), "Description": f"{panels} panels"})
        if args.html:
            cap = {"caption": " ".join(caption.words)}
            if caption.alphas is not None:
                cap["attention"] = attention_bytes(caption.alphas)
            rows.append({"src": htmlpage.image_uri(shown), "title": path, "refs": [], "caps": [cap]})
    print(f"saved {len(paths)} PNG(s) {'as ' + args.out if to_file else 'in ' + args.out + '/'}")
    if args.html:
        write_page(args, captioner, captions, rows)


def write_page(args, captioner, captions, rows):
    """caption.py --html: every image and its caption, in the results browser's layout (htmlpage.py)."""
    alphas = captions[0].alphas
    run = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    help_text = f"Captions by {args.checkpoint} at beam {args.beam_size}."
    if alphas is not None:
        help_text += " Hover over a word, or click one and step with the arrow keys, to see where the decoder looked."
    data = {"runs": [{"name": run, "label": f"{run} ({captioner.config['decoder']}), beam {args.beam_size}",
                      "grid": int(round(alphas.shape[1] ** 0.5)) if alphas is not None else None}],
            "split": "", "scored": False, "images": rows, "help": help_text}
    os.makedirs(os.path.dirname(os.path.abspath(args.html)), exist_ok=True)
    with atomic_path(args.html) as tmp, open(tmp, "w") as f:
        f.write(htmlpage.page(f"captions by {args.checkpoint}", data))
    print(f"page: {args.html}")


if __name__ == "__main__":
    run_cli(main)
