"""Captioning from Python: load a checkpoint once, caption paths, Pillow images or uint8 arrays.

    from captioner import Captioner
    captioner = Captioner("runs/demo-attention/best.pt")
    for c in captioner.caption(["photo.jpg"], beam_size=3):
        print(" ".join(c.words), c.score, None if c.alphas is None else c.alphas.shape)

caption.py is built on it. Images go through the same loading and resizing as the training data.
"""
import importlib
import importlib.util
import os
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def own_modules(*names):
    """This repository's modules `names` (and all they import), imported from its folder even from a
    notebook elsewhere beside another package of the same name (Hugging Face's `datasets` is common),
    installed or already imported: `pip install -e .` installs the flat modules under plain names, and
    an installed package of that name would come first. The user's own `import datasets` still gets
    theirs afterwards: the names of ours that another module shares leave sys.modules again (our
    modules keep what they imported). Modules imported this way must not import such a name inside a
    function, when it would be looked up again."""
    mine = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")}

    def here(module):
        return os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or "")) == HERE
    theirs = {n: sys.modules.pop(n) for n in mine if n in sys.modules and not here(sys.modules[n])}
    sys.path.insert(0, HERE)
    try:
        modules = [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(HERE)
    for name in [n for n in mine if n in sys.modules and here(sys.modules[n])]:
        ours = sys.modules.pop(name)
        if name in theirs:
            sys.modules[name] = theirs[name]
        elif not elsewhere(name):
            sys.modules[name] = ours  # no other module of this name: ours stays imported as usual
    return modules


def elsewhere(name):
    """Whether `import name` (ours not imported) would find a module outside this folder."""
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None and os.path.dirname(os.path.abspath(spec.origin)) != HERE


datasets, decoding, checkpoint, utils = own_modules("datasets", "decoding", "checkpoint", "utils")
image_array, load_image = datasets.image_array, datasets.load_image
DecodeOptions, caption_images, check_length = decoding.DecodeOptions, decoding.caption_images, decoding.check_length
load_trained = checkpoint.load_trained
InputError, pick_device = utils.InputError, utils.pick_device


class Captioner:
    """A trained encoder and decoder in eval mode, with their vocabulary and image size."""

    def __init__(self, checkpoint, device="auto", hard_inference=None, hard_inference_name="hard_inference="):
        """checkpoint: a checkpoint file, or a run folder (its best.pt, as caption.py and eval.py take it).
        hard_inference: hard attention attends to the expected context or to the argmax cell (default: the
        checkpoint's hard_inference; refused for a decoder without hard attention)."""
        self.device = pick_device(device)
        ckpt, self.encoder, self.decoder, self.vocab = load_trained(checkpoint, self.device, hard_inference,
                                                                    hard_inference_name)
        self.image_size = ckpt["image_size"]
        self.config = ckpt["config"]

    def image(self, image):
        """A path, a Pillow image, or a uint8 array (H x W, H x W x 3 or 4 as Pillow gives, or
        3 x H x W) -> 3 x S x S uint8 as the model takes it."""
        if isinstance(image, str | os.PathLike):
            if not os.path.isfile(image):
                raise InputError(f"image {image} not found")
            try:
                return load_image(image, self.image_size)
            except Exception as e:  # Pillow's many ways of saying "not an image"
                raise InputError(f"{image} is not a readable image ({type(e).__name__}: {e})") from None
        if isinstance(image, Image.Image):
            return image_array(image, self.image_size)
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise InputError(f"an image array must be uint8, H x W or H x W x C (or 3 x H x W); got {array.dtype} "
                             f"{array.shape}")
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] not in (3, 4):
            array = array.transpose(1, 2, 0)  # 3 x H x W -> H x W x 3
        return image_array(Image.fromarray(np.ascontiguousarray(array)), self.image_size)

    def caption(self, images, beam_size=5, max_len=None, length_penalty=0.0, block_ngram_repeat=0, batch_size=32):
        """One decoding.Caption (words, score, per-word attention maps or None) per image, in order.
        The options are checked, then every image is read before any is decoded, so a bad one fails fast."""
        options = self.options(beam_size, max_len, length_penalty, block_ngram_repeat)
        return self.decode([self.image(im) for im in images], options, batch_size=batch_size)

    def options(self, beam_size=5, max_len=None, length_penalty=0.0, block_ngram_repeat=0, max_len_name="max_len="):
        """DecodeOptions for this checkpoint (max_len: its max_decode_len by default), refused in one line
        naming `max_len_name` (how the caller's user gave it) when the decoder cannot write max_len words."""
        options = DecodeOptions(beam_size, max_len or self.config["max_decode_len"], length_penalty,
                                block_ngram_repeat, max_len_name)
        check_length(self.decoder.max_len, options.max_len, max_len_name)
        return options

    def decode(self, arrays, options, batch_size=32):
        """caption() for images already read by image(): 3 x S x S uint8 arrays, with options()."""
        captions = []
        for start in range(0, len(arrays), batch_size):
            batch = torch.from_numpy(np.stack(arrays[start:start + batch_size])).to(self.device)
            captions += caption_images(self.encoder, self.decoder, self.vocab, batch, options)
        return captions
