"""Score a checkpoint on a prepared split the way papers do: every image decoded once per beam size,
coco-caption metrics on PTB-tokenised text, plus nltk BLEU-4 (the tutorial's number) and, where the
data has object boxes (shapes), the scene measures and attention pointing accuracy.

    python eval.py --checkpoint runs/NAME/best.pt [--split TEST] [--beam-size 1 3 5] [--out FILE]
    python eval.py --checkpoint runs/NAME/best.pt --benchmark-decoding 100   # batched vs one at a time

coco-caption metrics use every raw reference of an image ({SPLIT}_REFS_{name}.json, written by
create_input_files.py), or the encoded references for data prepared elsewhere (said on screen and
in the JSON); nltk BLEU-4 uses the encoded references, as the tutorial does.

Writes the results (default: eval_{SPLIT}.json beside the checkpoint) and beside them, per beam
size, the captions in the COCO results format and a per-image file with every statistic the corpus
metrics are made of, from which compare.py gives each margin an interval (results.py says what each
file holds). An earlier eval of the same checkpoint on the same images keeps the beam sizes this one does
not recompute; what is replaced is said in one line.
"""
import functools
import itertools
import os

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import results
import shapes
from config import add_decoding_arguments, decoding_options
from datasets import CaptionDataset, Vocabulary, load_boxes, load_references, load_word_map
from decoding import beam_search, caption_images, check_length
from encoder import features_of
from hardware import OtherLoad, busy_note, timed
from metrics import (coco_metrics, java_available, mass_sums, nltk_bleu4, nltk_counts, pointing, pointing_accuracy,
                     scene_counts, scene_errors, scene_measures_of)
from checkpoint import check_word_map, load_trained, weights_id
from utils import (ArgumentParser, at_least, checkpoint_file, grid_side, pick_device,
                   run_cli)

COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "nltk BLEU-4")


BENCHMARK_RUNS = 3


def parse_args():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="TEST", choices=["TEST", "VAL"])
    add_decoding_arguments(p, beam_size=[1, 3, 5])
    p.add_argument("--batch-size", type=at_least(1), default=256, help="images decoded together (default 256: "
                   "on the demo's data every decoder searched faster at 256 than at 64; docs/benchmarks.md)")
    p.add_argument("--out", help="results JSON (default: eval_{SPLIT}.json beside the checkpoint)")
    p.add_argument("--data-folder", help="where the prepared data is now (default: the checkpoint's)")
    p.add_argument("--data-name", help="the prepared data's base name (default: the checkpoint's)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate the first N images only (0: all)")
    p.add_argument("--spice", action="store_true", help="also SPICE (needs Java and Stanford CoreNLP)")
    p.add_argument("--hard-inference", choices=["expected", "argmax"], help="hard attention: attend to the "
                   "alpha-weighted mean of the cells (expected) or to the most likely cell (argmax); default: the "
                   "checkpoint's hard_inference")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--benchmark-decoding", type=int, default=0, metavar="N",
                   help="time batched vs one-image-at-a-time decoding on N images, check they agree, and exit")
    args = p.parse_args()
    args.checkpoint = checkpoint_file(args.checkpoint)
    return args


def image_rows(ids, image_ids, caps, coco, references, boxes, points, layer_mass):
    """An ImageRow per image, in the split's order, with every per-image statistic a corpus metric is
    made of (significance.py resamples them). coco: each image's coco_metrics per-image scores and BLEU
    counts; points: each image's metrics.pointing() (a decoder with maps on shapes), or None; layer_mass:
    each image's mass_sums of each layer's maps ({} but for a Transformer). The maps are always kept:
    the results browser and compare.py's attention figure draw them."""
    rows = []
    for i in ids:
        c, scored = caps[i], coco[i]
        row = results.ImageRow(i, image_ids[i], " ".join(c.words), scored["CIDEr"], c.words in references[i],
                               bleu=scored["bleu"], nltk_bleu=nltk_counts(references[i], c.words),
                               ROUGE_L=scored["ROUGE-L"], meteor=scored["meteor"])
        if boxes is not None:
            row.scene_errors = scene_errors(c.words, boxes[i])
            row.describes_scene = not any(row.scene_errors.values())  # metrics.describes_scene, without parsing again
            row.scene = scene_counts(c.words, boxes[i])
        if points is not None:
            row.pointing = [None if p is None else int(p.hit) for p in points[i]]
            row.attention_mass = {**mass_sums(points[i]), **layer_mass.get(i, {})}
        if c.alphas is not None:
            row.attention = results.attention_bytes(c.alphas)
        rows.append(row)
    return rows


def attention_spread(maps):
    """How spread the attention maps of the generated words are: the mean entropy of a word's map (nats;
    ln P when uniform, 0 when one cell has it all) and the share of words whose map puts more than half
    its weight on one cell. maps: per caption, words x P."""
    alphas = torch.cat([m.float() for m in maps if len(m)])  # words x P
    entropy = -(alphas * alphas.clamp_min(1e-12).log()).sum(1)
    peaked = (alphas.max(1).values > 0.5).float().mean()
    return {"attention_entropy": float(entropy.mean()), "attention_peaked": float(peaked)}


def mass_scores(rows):
    """The attention mass measures of the split (their summed mass over their words) and, for the maps
    shown, their chance levels (the summed chance, over the same words), from each row's mass_sums."""
    total = {}
    for r in rows:
        for name, sums in r.attention_mass.items():
            total[name] = [a + b for a, b in zip(total.get(name, (0, 0, 0)), sums, strict=True)]
    out = {}
    for name, (mass, chance, words) in total.items():
        out[name] = mass / words if words else None
        if name in results.MASS_KINDS:  # a layer's words and chance are the maps' own
            out[f"{name}_chance"] = chance / words if words else None
    return out


@torch.no_grad()
def layer_pointing(loader, encoder, decoder, device, vocab, captions, boxes, image_size):
    """Each layer's maps of a decoder whose maps average several (the Transformer) scored as mass_sums,
    for the captions of every beam size ({beam: {image: Caption}}): {beam: {image: {attention_mass_layer{n}:
    sums}}}, {} for the others. The maps are a teacher-forced pass's over the captions found, which are
    stepping's (forward == stepping, tests/test_decoders.py): one pass per layer instead of a beam search
    per layer, the images encoded once for every beam size."""
    found, shown = {k: {} for k in captions}, decoder.map_layer
    if not decoder.map_layers:
        return {}
    try:
        for batch in loader:
            feats, ids = features_of(encoder, batch.image.to(device)), batch.index.tolist()  # B x P x D
            for (k, caps), layer in itertools.product(captions.items(), range(decoder.map_layers)):
                decoder.map_layer = layer
                words = [caps[i].words for i in ids]
                for i, w, m in zip(ids, words, teacher_forced_maps(decoder, vocab, feats, words), strict=True):
                    found[k].setdefault(i, {}).update(
                        mass_sums(pointing(w, m, boxes[i], image_size, shapes.POINTING_WORDS), layer=layer + 1))
    finally:
        decoder.map_layer = shown
    return found


def teacher_forced_maps(decoder, vocab, features, words):
    """The decoder's maps over its features (B x P x D) while reading the captions `words` (B word lists),
    each a len(words) x P tensor on the CPU."""
    longest = max(map(len, words))
    captions = torch.tensor([vocab.encode(w, longest) for w in words], device=features.device)  # B x L
    lengths = torch.tensor([len(w) + 2 for w in words], device=features.device)
    maps = decoder(features, captions, lengths)[1].float().cpu()  # B x T x P, T = longest + 1
    return [m[:len(w)] for m, w in zip(maps, words, strict=True)]


def setup(args):
    device = pick_device(args.device)
    ckpt, encoder, decoder, _ = load_trained(args.checkpoint, device, args.hard_inference, "--hard-inference")
    cfg = ckpt["config"]
    folder, name = args.data_folder or cfg["data_folder"], args.data_name or cfg["data_name"]
    check_word_map(ckpt, load_word_map(folder, name), folder, name, args.checkpoint,
                   "evaluate on the data it was trained on")
    dataset = CaptionDataset(folder, name, args.split)
    if args.max_images:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    boxes = load_boxes(folder, name, args.split)
    refs = load_references(folder, name, args.split, len(dataset.dataset if isinstance(dataset, Subset) else dataset))
    return ckpt, dataset, encoder, decoder, device, boxes, refs


def benchmark_decoding(args, dataset, encoder, decoder, vocab, cfg, device):
    """Batched vs one-image-at-a-time beam search on the same images, each timed BENCHMARK_RUNS times
    after a warm-up run (bench.py's way: the first run pays for allocation and lazy set-up): images/s
    as the median and the range, whether the captions agree (they must: same search, same scores), and
    whether other processes used the CPU meanwhile."""
    images = torch.stack([dataset[i].image for i in range(min(args.benchmark_decoding, len(dataset)))]).to(device)
    with torch.no_grad():
        features = encoder(images)
    n = len(features)
    print(f"{n} images, the median of {BENCHMARK_RUNS} runs after a warm-up (lowest-highest)")
    print(f"{'beam':>4s} {'batched img/s':>22s} {'one at a time img/s':>22s} {'speed-up':>9s} {'same captions':>14s}")
    rows = []
    for k in args.beam_size:
        options = decoding_options(args, cfg, k)
        seqs, search = {}, functools.partial(decode_features, decoder, features, vocab, options)
        batched, single = functools.partial(search, args.batch_size, seqs, "batched"), functools.partial(
            search, 1, seqs, "single")
        with OtherLoad() as load:
            b, s = timed(batched, device, BENCHMARK_RUNS, 1), timed(single, device, BENCHMARK_RUNS, 1)
        same = seqs["batched"] == seqs["single"]
        rows.append({"beam_size": k, "images": n, "batched_images_per_s": n / b[0], "single_images_per_s": n / s[0],
                     "batched_range": [n / b[2], n / b[1]], "single_range": [n / s[2], n / s[1]],
                     "speedup": s[0] / b[0], "same_captions": same, "others_cores": load.cores})
        spread = [f"{n / t[0]:.1f} ({n / t[2]:.0f}-{n / t[1]:.0f})" for t in (b, s)]
        print(f"{k:4d} {spread[0]:>22s} {spread[1]:>22s} {s[0] / b[0]:8.1f}x {str(same):>14s}{load.note}")
    return rows


def decode_features(decoder, features, vocab, options, size, out, key):
    """Beam search over `features` (N x P x D), `size` images at a time: out[key] = the N token lists."""
    found = [beam_search(decoder, features[i:i + size], vocab, options) for i in range(0, len(features), size)]
    out[key] = [seq for d in found for seq in d.seqs]


def caption_split(loader, encoder, decoder, device, vocab, options):
    """Decode every image once: {image index: Caption}."""
    captions = {}
    for batch in tqdm(loader, desc=f"beam {options.beam_size}", unit="batch", leave=False):
        out = caption_images(encoder, decoder, vocab, batch.image.to(device, non_blocking=True), options)
        captions.update(zip(batch.index.tolist(), out, strict=True))
    return captions


def references_used(args, base, vocab, ids, refs_file):
    """(encoded references per image as word lists, the references coco-caption scores against, the
    images' dataset ids, what was used). coco-caption scores against every raw reference (the REFS
    file), as papers do; data prepared elsewhere has only the encoded ones (sampled to
    captions_per_image, <unk>-ed, long ones dropped)."""
    encoded = {i: [vocab.decode(c) for c in base.image_captions(i).tolist()] for i in ids}
    if refs_file is not None:
        raw = {i: refs_file[i]["references"] for i in ids}
        counts = [len(r) for r in raw.values()]
        return encoded, raw, {i: refs_file[i]["image_id"] for i in ids}, {
            "kind": "raw", "per_image_min": min(counts), "per_image_max": max(counts),
            "per_image_mean": sum(counts) / len(counts)}
    print(f"note: no {args.split}_REFS file (data prepared elsewhere): coco-caption scores against the encoded "
          "references, which may be sampled, <unk>-ed and without long captions")
    return encoded, {i: [" ".join(r) for r in encoded[i]] for i in ids}, {i: i for i in ids}, {
        "kind": "encoded", "per_image_min": base.cpi, "per_image_max": base.cpi, "per_image_mean": base.cpi}


def main():
    args = parse_args()
    ckpt, dataset, encoder, decoder, device, boxes, refs_file = setup(args)
    vocab, cfg = Vocabulary(ckpt["word_map"]), ckpt["config"]
    check_length(decoder.max_len, decoding_options(args, cfg, 1).max_len, "--max-len")  # before anything is made
    if args.benchmark_decoding:
        benchmark_decoding(args, dataset, encoder, decoder, vocab, cfg, device)
        return
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_{args.split}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    earlier = results.read_results(out)  # read first: a broken file stops the run before the decoding

    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    ids = list(range(len(dataset)))
    references, coco_refs, image_ids, used = references_used(args, base, vocab, ids, refs_file)
    if not java_available():
        print("note: java not found: PTB tokenisation falls back to nltk's Treebank tokenizer; METEOR unavailable")

    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    captions, timings, others = {}, {}, {}
    for k in args.beam_size:
        with OtherLoad() as load:  # the decoding's wall time, and what other processes took of the CPU
            captions[k] = caption_split(loader, encoder, decoder, device, vocab, decoding_options(args, cfg, k))
        timings[k], others[k] = load.seconds, load.cores
    scores_by_beam, unavailable, coco_by_beam = coco_metrics(
        coco_refs, {k: {i: " ".join(captions[k][i].words) for i in ids} for k in captions}, spice=args.spice)

    new = results.EvalResults(
        checkpoint=os.path.abspath(args.checkpoint), weights=weights_id(ckpt), epoch=ckpt["epoch"], split=args.split,
        images=len(dataset), data_folder=args.data_folder or cfg["data_folder"],
        data_name=args.data_name or cfg["data_name"], decoder=cfg["decoder"],
        decoder_parameters=sum(v.numel() for v in ckpt["decoder"].values()), references=used, config=cfg,
        unavailable=unavailable, attention_inference=("argmax" if decoder.argmax_attention else "expected")
        if decoder.hard_attention else None, format=results.FORMAT)
    coco_captions, tables, layer_mass = {}, {}, {}
    if boxes is not None and decoder.returns_maps:
        layer_mass = layer_pointing(loader, encoder, decoder, device, vocab, captions, boxes, base.image_size)
    for k, caps in captions.items():
        scores = scores_by_beam[k]
        words = [caps[i].words for i in ids]
        scores["nltk BLEU-4"] = nltk_bleu4([references[i] for i in ids], words)
        points, options = None, decoding_options(args, cfg, k)
        if boxes is not None and decoder.returns_maps:
            points = {i: pointing(caps[i].words, caps[i].alphas, boxes[i], base.image_size, shapes.POINTING_WORDS)
                      for i in ids}
            acc, chance, counted = pointing_accuracy(points.values())
            scores.update({"pointing": acc, "pointing_chance": chance, "pointing_words": counted})
        rows = image_rows(ids, image_ids, caps, coco_by_beam[k], references, boxes, points, layer_mass.get(k, {}))
        if points is not None:
            scores.update(mass_scores(rows))
        if boxes is not None:
            scores.update(scene_measures_of([r.exact_match for r in rows], [r.scene for r in rows]))
        if decoder.returns_maps:
            scores.update(attention_spread([caps[i].alphas for i in ids]))
        captions_file, images_file = results.file_names(out, k)
        new.beams[k] = results.BeamResult(k, scores, len(ids) / timings[k], timings[k], options.max_len,
                                          options.length_penalty, options.block_ngram_repeat, captions_file,
                                          images_file, others[k])
        coco_captions[k] = [{"image_id": image_ids[i], "caption": " ".join(caps[i].words)} for i in ids]
        alphas = caps[ids[0]].alphas
        tables[k] = results.ImageTable(args.split, k, None if alphas is None else grid_side(alphas.shape[1]), rows)

    print_table(args, cfg, new, boxes is not None, decoder.returns_maps)
    merged, replaced = results.merge(earlier, new)
    results.write(out, merged, coco_captions, tables)
    if replaced:
        print(f"{out}: {replaced}")
    stem = os.path.splitext(out)[0]
    print(f"results in {out} (beam {', '.join(map(str, merged.beams))}), captions in {stem}_captions_beam*.json, "
          f"per-image scores in {stem}_images_beam*.json")


def print_table(args, cfg, res, scene, maps):
    """The metrics of this eval, one row per beam size."""
    used, pointed = res.references, maps and scene
    print(f"\n{args.split} of {res.data_name}, {res.images} images, {cfg['decoder']} decoder, {args.checkpoint}")
    lo, hi, mean = used["per_image_min"], used["per_image_max"], used["per_image_mean"]
    count = f"{lo} per image" if lo == hi else f"{lo} to {hi} per image, {mean:.2f} on average"
    print(f"coco-caption metrics against the {used['kind']} references ({count}); nltk BLEU-4 against the "
          "encoded references (the tutorial's protocol)")
    print(f"{'beam':>4s} " + " ".join(f"{c:>11s}" for c in COLUMNS)
          + (f" {'pointing':>16s} {'attention mass':>16s}" if pointed else "") + f" {'img/s':>8s}")
    for k, beam in res.beams.items():
        m = beam.metrics
        row = f"{k:4d} " + " ".join(f"{m[c]:11.4f}" if m[c] is not None else f"{'n/a':>11s}" for c in COLUMNS)
        if pointed:
            row += "".join(f" {m[c]:7.1%} (ch {m[c + '_chance']:4.1%})" if m.get(c) is not None else f" {'n/a':>16s}"
                           for c in ("pointing", "attention_mass"))
        print(row + f" {beam.images_per_s:8.1f}{busy_note(beam.others_cores)}")
    if pointed:
        print_mass(res)
    if scene:
        first = next(iter(res.beams.values())).metrics
        keys = [c for c in first if c.startswith(("exact", "phrase", "relation_a"))]
        print("\nscene measures (shapes)\n" + f"{'beam':>4s} " + " ".join(f"{c.replace('_', ' '):>22s}" for c in keys))
        for k, beam in res.beams.items():
            m = beam.metrics
            print(f"{k:4d} " + " ".join(f"{m[c]:22.1%}" if m[c] is not None else f"{'n/a':>22s}" for c in keys))
    for metric, reason in res.unavailable.items():
        print(f"{metric} unavailable: {reason}")


def print_mass(res):
    """The attention mass of colour and shape words apart, and of each layer's maps where there are layers."""
    first = next(iter(res.beams.values())).metrics
    keys = [k for k in first if k.startswith("attention_mass_") and not k.endswith("_chance")]
    if not keys:
        return
    print("\nattention mass: the share of a colour or shape word's map on the objects it names (chance: their share "
          "of the grid)\n" + f"{'beam':>4s} " + " ".join(f"{results.label(c):>30s}" for c in keys))
    for k, beam in res.beams.items():
        m = beam.metrics
        print(f"{k:4d} " + " ".join(f"{m[c]:30.1%}" if m.get(c) is not None else f"{'n/a':>30s}" for c in keys))


if __name__ == "__main__":
    run_cli(main)
