"""Captioning from Python: load a checkpoint once, caption paths, Pillow images or uint8 arrays.

    from captioner import Captioner
    captioner = Captioner("runs/demo-attention/best.pt")
    for c in captioner.caption(["photo.jpg"], beam_size=3):
        print(" ".join(c.words), c.score, None if c.alphas is None else c.alphas.shape)

caption.py is built on it. Images go through the same loading and resizing as the training data.
"""
import os

import numpy as np
import torch
from PIL import Image

from datasets import image_array, load_image
from decoding import DecodeOptions, caption_images, check_length
from checkpoint import load_trained
from utils import InputError, pick_device


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
