"""Caption your own images. For a decoder with attention maps (attention, transformer), also save where
it looked for each word.

    python caption.py --checkpoint runs/NAME/best.pt --image photo.jpg [more.jpg ...] [--beam-size 5]
    python caption.py --checkpoint runs/NAME/best.pt --folder photos/ [--out overlays/] [--html page.html]

Decoding options are eval.py's: --beam-size, --max-len, --length-penalty, --block-ngram-repeat.

Prints one caption per image and saves one PNG per image: the image, then (a decoder with maps) one
panel per generated word with its attention map upsampled smoothly over the image, or (plain
decoder) the image under its caption. --out is a folder (default: captions/ beside the checkpoint),
or a .png file when there is one image. --html PAGE also writes one self-contained page of every
image and its caption, where hovering over a word (or stepping through the words with the arrow
keys) shows its attention map. Images are read and resized exactly as in data preparation. In a
folder, files without an image's extension are left out (and named); an unreadable image stops the
run unless --skip-bad-images is given.
"""
import os

from captioner import Captioner
from config import add_decoding_arguments
from datasets import SPECIAL_TOKENS, load_image
from utils import ArgumentParser, InputError, atomic_path, checkpoint_file, grid_side, run_cli
from results import attention_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(args):
    if args.folder:
        if not os.path.isdir(args.folder):
            raise InputError(f"folder {args.folder} not found")
        names = sorted(f for f in os.listdir(args.folder) if os.path.isfile(os.path.join(args.folder, f)))
        paths = [os.path.join(args.folder, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
        others = [f for f in names if not f.lower().endswith(IMAGE_EXTENSIONS)]
        if not paths:
            raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {args.folder}")
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            print(f"note: left out {len(others)} file(s) of {args.folder} without an image's extension: {shown}")
        return paths
    for path in args.image:
        if not os.path.isfile(path):
            raise InputError(f"image {path} not found")
    return args.image


def read_images(captioner, paths, skip_bad):
    """(paths, arrays) of the images that could be read; an unreadable one is an error, or is left
    out with a line saying so when skip_bad."""
    kept, arrays, bad = [], [], []
    for path in paths:
        try:
            arrays.append(captioner.image(path))
            kept.append(path)
        except InputError as e:
            bad.append(str(e))
            if skip_bad:
                print(f"skipped {path}: {e}")
    if bad and not skip_bad:  # every bad file in one line, so that one fix-and-retry is enough
        raise InputError(f"{len(bad)} of {len(paths)} images cannot be read: {'; '.join(bad)}; pass "
                         "--skip-bad-images to caption the others")
    if not kept:
        raise InputError("none of the images could be read")
    return kept, arrays


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="image files")
    source.add_argument("--folder", help="caption every image in this folder")
    add_decoding_arguments(p, beam_size=5)
    p.add_argument("--out", help="folder for the PNGs (default: captions/ beside the checkpoint), or a .png file "
                   "for one image")
    p.add_argument("--html", metavar="PAGE", help="also write this self-contained HTML page (say captions.html)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out images that cannot be read, saying "
                   "which, instead of stopping")
    p.add_argument("--hard-inference", choices=["expected", "argmax"], help="hard attention: attend to the "
                   "alpha-weighted mean of the cells, or to the most likely cell (default: the checkpoint's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    args.checkpoint = checkpoint_file(args.checkpoint)

    paths = image_paths(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "captions")
    to_file = out.lower().endswith(".png")
    if not to_file and out.lower().endswith(IMAGE_EXTENSIONS):
        raise InputError(f"--out {out}: the overlays are PNG files: give a .png name, or a folder for them")
    if to_file and len(paths) > 1:
        raise InputError(f"--out {out} is one file but there are {len(paths)} images: give a folder")
    if args.html and os.path.isdir(args.html):
        raise InputError(f"--html {args.html} is a folder: give the page's file name, say {args.html}/captions.html")
    captioner = Captioner(args.checkpoint, args.device, args.hard_inference, "--hard-inference")
    options = captioner.options(args.beam_size, args.max_len, args.length_penalty, args.block_ngram_repeat, "--max-len")
    if captioner.config.get("data_name", "").startswith("shapes_"):
        words = len(captioner.vocab) - len(SPECIAL_TOKENS)
        print(f"note: {args.checkpoint} was trained on the built-in shapes data: its {words}-word "
              "vocabulary describes coloured shapes, so it sees shapes in any photo")
    paths, arrays = read_images(captioner, paths, args.skip_bad_images)  # every file is read before any output
    names, seen = [], {}
    for path in paths:  # photo.png, and photo_2.png for a second photo.* from another folder
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    captions = captioner.decode(arrays, options)
    from visualize import DPI, caption_figure, save  # matplotlib, once the arguments and images are good
    targets = [out] if to_file else [os.path.join(out, name) for name in names]
    replaced = sum(os.path.exists(t) for t in targets)
    rows = []
    for path, caption, name in zip(paths, captions, names, strict=True):
        print(f"{path}: {' '.join(caption.words)}")
        shown = load_image(path, max(256, captioner.image_size))
        fig, panels = caption_figure(shown, caption.words, caption.alphas)
        target = out if to_file else os.path.join(out, name)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        save(fig, target, dpi=DPI, metadata={"Title": " ".join(caption.words), "Description": f"{panels} panels"})
        if args.html:
            cap = {"caption": " ".join(caption.words)}
            if caption.alphas is not None:
                cap["attention"] = attention_bytes(caption.alphas)
            import htmlpage  # the HTML code, only for --html
            rows.append({"src": htmlpage.image_uri(shown), "title": path, "refs": [], "caps": [cap]})
    print(f"saved {len(paths)} PNG(s) {'as ' + out if to_file else 'in ' + out + '/'}"
          + (f", replacing {replaced} of an earlier run (--out FOLDER keeps them)" if replaced else ""))
    if args.html:
        write_page(args, captioner, captions, rows)


def write_page(args, captioner, captions, rows):
    """caption.py --html: every image and its caption, in the results browser's layout (htmlpage.py)."""
    import htmlpage
    alphas = captions[0].alphas
    run = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    help_text = f"Captions by {args.checkpoint} at beam {args.beam_size}."
    if alphas is not None:
        help_text += " Hover over a word, or click one and step with the arrow keys, to see where the decoder looked."
    data = {"runs": [{"name": run, "label": f"{run} ({captioner.config['decoder']}), beam {args.beam_size}",
                      "grid": grid_side(alphas.shape[1]) if alphas is not None else None}],
            "split": "", "scored": False, "images": rows, "help": help_text}
    os.makedirs(os.path.dirname(os.path.abspath(args.html)), exist_ok=True)
    with atomic_path(args.html) as tmp, open(tmp, "w") as f:
        f.write(htmlpage.page(f"captions by {args.checkpoint}", data))
    print(f"page: {args.html}")


if __name__ == "__main__":
    run_cli(main)
