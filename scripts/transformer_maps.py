"""Which of the Transformer's maps point best: each layer's cross-attention (averaged over its heads)
and the mean over the layers, scored by pointing accuracy on a shapes split (VAL by default: the
choice of transformer.TransformerDecoder.map_layer must not be made on TEST).

    python scripts/transformer_maps.py --checkpoint runs/demo-transformer/best.pt [--split VAL] [--beam-size 3]

The table gives each choice's pointing, its chance level and the words counted.
"""
import os
import sys

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shapes  # noqa: E402
from checkpoint import load_trained  # noqa: E402
from datasets import CaptionDataset, load_boxes  # noqa: E402
from decoding import DecodeOptions, caption_images  # noqa: E402
from metrics import pointing, pointing_accuracy  # noqa: E402
from utils import ArgumentParser, InputError, at_least, run_cli  # noqa: E402


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="VAL", choices=["VAL", "TEST"])
    p.add_argument("--beam-size", type=at_least(1), default=3)
    p.add_argument("--max-images", type=at_least(0), default=0, help="the first N images only (0: all)")
    args = p.parse_args()
    ckpt, encoder, decoder, vocab = load_trained(args.checkpoint, torch.device("cpu"))
    cfg = ckpt["config"]
    if not decoder.map_layers:
        raise InputError(f"{args.checkpoint} was trained with --decoder {cfg['decoder']}: this script is for --decoder "
                         "transformer")
    boxes = load_boxes(cfg["data_folder"], cfg["data_name"], args.split)
    if boxes is None:
        raise InputError(f"{cfg['data_folder']} has no object boxes: pointing is measured on shapes data only")
    dataset = CaptionDataset(cfg["data_folder"], cfg["data_name"], args.split)
    count = min(args.max_images or len(dataset), len(dataset))
    choices = [*range(len(decoder.layers)), None]
    options = DecodeOptions(args.beam_size, cfg["max_decode_len"])
    found = {}
    loader = DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=64)
    for choice in choices:  # the same captions each time: the maps are read off the attention, not fed back
        decoder.map_layer, found[choice] = choice, []
        for batch in loader:
            captions = caption_images(encoder, decoder, vocab, batch.image, options)
            found[choice] += [pointing(c.words, c.alphas, boxes[i], dataset.image_size, shapes.POINTING_WORDS)
                              for i, c in zip(batch.index.tolist(), captions, strict=True)]
    print(f"{args.split}, {count} images, beam {args.beam_size}: pointing of each choice of maps")
    print(f"{'maps':>22s} {'pointing':>9s} {'chance':>7s} {'words':>6s}")
    for choice in choices:
        acc, chance, words = pointing_accuracy(found[choice])
        name = "mean of the layers" if choice is None else f"layer {choice + 1} of {len(decoder.layers)}"
        print(f"{name:>22s} {acc:9.1%} {chance:7.1%} {words:6d}")


if __name__ == "__main__":
    run_cli(main)
