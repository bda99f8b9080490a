"""Benchmark the real training step and decoding on synthetic data: images/s and peak memory.

    python bench.py --config configs/shapes.yaml --image-size 64 --vocab 44 --out bench_cpu.json  # shapes
    python bench.py --device cuda --out bench_gpu.json                          # the reference model, ResNet-101
    python bench.py --tiny                                                             # seconds: a smoke run

Training: decoder x precision (fp32, fp16 with the gradient scaler, bf16) x encoder (frozen, fine-tuned,
cached features) x accumulation steps, each timed through train.train_step, the function train.py
runs, on batches that start on the host as the DataLoader delivers them (uint8 images or fp16 cached
features). --batch-size is the effective batch: with accumulation N each micro-batch holds
batch_size / N images, so the memory column shows what accumulation saves at an equal batch.
Decoding: batched vs one image at a time at each beam size, on random features with an untrained
decoder made never to say <end>: every caption runs to --decode-len words in both, so both do the
same work (the worst case for early stopping). Each figure is the median of --runs timed runs after
warm-up (spread: min-max).
"""
import functools
import itertools
import json
import os
import platform
import time
from datetime import date

import torch

import train
from datasets import SPECIAL_TOKENS, TrainItem, Vocabulary
from hardware import OtherLoad, amp_context, busy_note, onednn, peak_memory_mb, sync, timed
from decoding import DecodeOptions, check_length, decode
from distributed import EpochSampler
from models import DECODERS, TINY, decoder_class
from transformer import TransformerDecoder
from config import default_config, merge_config, read_yaml
from utils import ArgumentParser, InputError, atomic_path, pick_device, run_cli

PRECISIONS = {"fp32": dict(amp=False), "fp16": dict(amp=True, amp_dtype="float16"),
              "bf16": dict(amp=True, amp_dtype="bfloat16")}
ENCODERS = ("frozen", "finetune", "cached")


def parse_args():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML overlay on configs/default.yaml (the model; default: the reference "
                   "experiment's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--decoder", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    p.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--encoder-mode", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    p.add_argument("--accumulation", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch-size", nargs="+", type=int, default=[32], help="effective batch sizes, in captions")
    p.add_argument("--group", nargs="+", type=int, default=[1], metavar="K", help="captions per image in a batch "
                   "(group_by_image; 1: every caption with its own image)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vocab", type=int, default=10000, help="words (about COCO's at min_word_freq 5; the "
                   "tutorial's word map, counted over all splits, has 9490)")
    p.add_argument("--caption-len", type=int, default=24, help="longest caption in a batch, in tokens (each "
                   "batch's lengths uniform from half of it; with --data-folder, drawn from its TRAIN captions)")
    p.add_argument("--length-pool", nargs="+", type=int, default=[0], metavar="P", help="train.py's length_pool: "
                   "batches drawn from the data's lengths in pools of P batches sorted by length (with --data-folder)")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per timed run, each on a batch of its own")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (cuDNN autotuning, allocator)")
    p.add_argument("--beam-size", nargs="+", type=int, default=[1, 3, 5])
    p.add_argument("--decode-images", type=int, default=128, help="images decoded in batches")
    p.add_argument("--decode-single", type=int, default=16, help="images decoded one at a time")
    p.add_argument("--decode-len", type=int, default=20)
    p.add_argument("--compile-decoding", action="store_true", help="also time batched decoding with each "
                   "decoder's step compiled (torch.compile, dynamic shapes), and the compilation")
    p.add_argument("--data-folder", help="draw the batches' caption lengths from this prepared TRAIN split, as "
                   "train.py's sampler does, and time the DataLoader over it")
    p.add_argument("--data-name")
    p.add_argument("--profile", action="store_true", help="write torch.profiler tables beside --out: each "
                   "decoder's first training configuration, and one batch of decoding at the largest beam")
    p.add_argument("--tiny", action="store_true", help="a tiny model and 2 runs: checks the script in seconds")
    p.add_argument("--out", help="results JSON (default: print only)")
    args = p.parse_args()
    if min(args.batch_size + args.accumulation + args.beam_size) < 1 or args.runs < 1 or args.steps < 1:
        p.error("batch sizes, accumulation steps, beam sizes, --runs and --steps must be at least 1")
    if min(args.length_pool) < 0 or args.length_pool != [0] and not args.data_folder:
        p.error("--length-pool draws lengths from the data: give --data-folder (and pools of 0 or more batches)")
    return args


def model_config(args):
    cfg = default_config()
    if args.config:
        cfg = merge_config(cfg, read_yaml(args.config), args.config)
    cfg = merge_config(cfg, {"device": args.device, "workers": 0, "encoder_weights": "none",
                             "max_decode_len": args.decode_len}, "bench.py")
    if args.tiny:
        cfg = merge_config(cfg, {**TINY, "encoder_stages": 2}, "--tiny")  # a stage past the stem, to fine-tune
        args.image_size, args.vocab, args.caption_len, args.runs, args.steps = 32, 50, 8, 2, 1
        args.batch_size, args.decode_images, args.decode_single, args.warmup = [4], 8, 2, 1
    return cfg


class PeakMemory:
    """Peak memory of what runs inside: allocated CUDA memory, or on CPU the process's peak resident
    set (which includes Python and torch themselves), reset through /proc/self/clear_refs."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass  # not Linux: the peak since start
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = peak_memory_mb(self.device)
            if os.path.exists("/proc/self/status"):
                with open("/proc/self/status") as f:
                    self.mb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024


def word_map_of(size):
    words = [f"w{i}" for i in range(size - len(SPECIAL_TOKENS))]
    return {w: i for i, w in enumerate(["<pad>"] + words + ["<unk>", "<start>", "<end>"])}


def caption_lengths(args, data, n, micro, k, pool):
    """The lengths (tokens, <start> and <end> included) of `n` micro-batches of `micro` captions, n x
    micro: with `data` (--data-folder's TRAIN split) the first batches train.py's sampler draws from its
    captions (k per image, grouped when k > 1; length_pool `pool`), else uniform from half of
    --caption-len, each batch's first caption the longest."""
    if data is None:
        lens = torch.randint(args.caption_len // 2, args.caption_len + 1, (n, micro),
                             generator=torch.Generator().manual_seed(0))
        lens[:, 0] = args.caption_len
        return lens
    sampler = EpochSampler(data.num_images, data.cpi, 0, k if k > 1 else 0, micro, grouped=k > 1,
                           lengths=data.caplens, length_pool=pool)
    items = list(itertools.islice(sampler, n * micro // k))
    return data.caplens[torch.tensor(items)].view(n, micro).long()


def micro_batches(run, lengths, args, cached, feature_shape, k=1):
    """Micro-batches of captions of these lengths (n x micro) on the host, as the DataLoader hands them
    over (pinned on CUDA); with k > 1, micro / k images with k captions each (group_by_image)."""
    g = torch.Generator().manual_seed(0)
    batches, micro, longest = [], lengths.size(1), int(lengths.max())
    for lens in lengths:
        if cached:
            x = torch.randn((micro // k,) + feature_shape, generator=g).half()
        else:
            x = torch.randint(0, 256, (micro // k, 3, args.image_size, args.image_size), dtype=torch.uint8,
                              generator=g)
        caps = torch.randint(1, len(run.word_map) - 3, (micro, longest), generator=g)
        caps[:, 0] = run.word_map["<start>"]
        caps[torch.arange(micro), lens - 1] = run.word_map["<end>"]
        caps[torch.arange(longest)[None] >= lens[:, None]] = 0
        if k > 1:
            caps, lens = caps.view(micro // k, k, -1), lens.view(micro // k, k)
        batch = TrainItem(x, caps, lens, torch.arange(micro // k))
        if run.device.type == "cuda":
            batch = TrainItem(*(b.pin_memory() for b in batch))
        batches.append(batch)
    return batches


def run_steps(run, groups, amp):
    for group in groups:
        train.train_step(run, group, amp)


def bench_training(args, base, device, word_map, data, peak):
    rows, profiled = [], set()
    matrix = itertools.product(args.decoder, args.precision, args.encoder_mode, args.batch_size, args.accumulation,
                               args.group, args.length_pool)
    for decoder, precision, mode, batch, acc, k, pool in matrix:
        if precision == "fp16" and device.type != "cuda" or batch % acc or (batch // acc) % k:
            continue  # CPU autocast in fp16 is slow and train.py does not use it
        cfg = dict(base, decoder=decoder, fine_tune_encoder=mode == "finetune", batch_size=batch // acc,
                   accumulation_steps=acc, **PRECISIONS[precision])
        torch.manual_seed(0)
        run = train.build_run(cfg, word_map, args.image_size, device)
        shape = feature_shape(run, args, cached=True) if mode == "cached" else None
        run.encoder.train()
        run.decoder.train()
        lengths = caption_lengths(args, data, args.steps * acc, batch // acc, k, pool)  # steps*acc x micro
        batches = micro_batches(run, lengths, args, mode == "cached", shape, k)
        groups = [batches[i:i + acc] for i in range(0, len(batches), acc)]  # a timed run: one step on each
        steps = functools.partial(run_steps, run, groups, amp_context(cfg, device))
        row = {"decoder": decoder, "precision": precision, "encoder": mode, "batch": batch, "accumulation": acc,
               "micro_batch": batch // acc, "captions_per_image": k, "length_pool": pool,
               # the word positions that hold a word, of those the decoder computes (each batch to its longest)
               "useful_share": float((lengths - 1).sum() / ((lengths.amax(1) - 1) * lengths.size(1)).sum())}
        try:
            row["flop"] = step_flops(steps) / args.steps  # a step's, on average
            with PeakMemory(device) as mem, OtherLoad() as load:
                med, lo, hi = timed(steps, device, args.runs, args.warmup)
        except RuntimeError as e:  # a kernel this machine lacks: say which, and go on with the others
            rows.append({**row, "error": str(e).splitlines()[0][:200]})
            print(f"train {decoder:9s} {precision} {mode:8s} batch {batch} x{acc} k{k}: cannot run here "
                  f"({rows[-1]['error']})", flush=True)
            continue
        images = batch * args.steps
        row.update({"images_per_s": images / med, "images_per_s_min": images / hi, "images_per_s_max": images / lo,
                    "gflop_per_s": row["flop"] * args.steps / med / 1e9, "peak_memory_mb": mem.mb,
                    "others_cores": load.cores})
        row["peak_share"] = row["gflop_per_s"] / peak
        rows.append(row)
        print(f"train {decoder:9s} {precision} {mode:8s} batch {batch} x{acc} k{k} pool {pool}: "
              f"{row['images_per_s']:8.1f} img/s, {row['flop'] / 1e9:.2f} GFLOP a step ({row['useful_share']:.0%} "
              f"useful), {row['gflop_per_s']:.1f} GFLOP/s = {row['peak_share']:.1%} of the matmul peak, "
              f"{mem.mb:7.0f} MiB{load.note}", flush=True)
        if args.profile and args.out and decoder not in profiled:
            profile(args, steps, device, f"{decoder}_{precision}_{mode}")
            profiled.add(decoder)
    return rows


def step_flops(fn):
    """The floating-point operations of one call, counted by torch (FlopCounterMode: the matrix
    products, convolutions and attention, forward and backward; element-wise work is not counted).
    oneDNN is off while counting: its fused LSTM kernel is invisible to the counter, torch's own LSTM
    does the same products one by one."""
    from torch.utils.flop_counter import FlopCounterMode
    with onednn(False), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, n=2048, runs=10):
    """GFLOP/s of an n x n fp32 matrix product on this device: the rate the steps are measured against,
    in the same run (other load and clocks as theirs)."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    med, lo, hi = timed(lambda: a @ b, device, runs, 3)
    return 2 * n**3 / med / 1e9


def feature_shape(run, args, cached=False):
    """What the decoders read of one image (P x D), or what the feature cache holds of it (C x g x g)."""
    with torch.no_grad():
        probe = torch.zeros(1, 3, args.image_size, args.image_size, dtype=torch.uint8, device=run.device)
        encoder = run.encoder.eval()
        return tuple((encoder.cache_grid(probe) if cached else encoder(probe)).shape[1:])


def profile(args, fn, device, name):
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path = os.path.splitext(args.out)[0] + f"_profile_{name}.txt"
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=25))
    print(f"profile: {path}")


def decode_all(decoder, features, vocab, size, beam, max_len):
    """Every image's caption (token ids), decoded `size` images at a time."""
    options = DecodeOptions(beam, max_len, max_len_name="--decode-len")
    return [seq for i in range(0, len(features), size)
            for seq in decode(decoder, features[i:i + size], vocab, options).seqs]


class Recomputed(torch.nn.Module):
    """The Transformer decoder without its key/value cache, to measure what the cache saves: each step
    runs the whole prefix again, as self-critical.pytorch's TransformerModel decodes. Its state is the
    words so far (B x t), which beam search reorders like any entry."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder, self.image_state, self.max_len = decoder, (), decoder.max_len

    def init_state(self, features):
        return {"words": torch.zeros(features.size(0), 0, dtype=torch.long, device=features.device)}

    def step(self, prev_words, state, features):
        words = torch.cat([state["words"], prev_words[:, None]], 1)  # B x t+1
        logits, maps = self.decoder(features, words, torch.full((words.size(0),), words.size(1) + 1))
        return logits[:, -1], {"words": words}, maps[:, -1]


def bench_decoding(args, base, device, word_map):
    rows = []
    size, single, runs = min(args.batch_size), min(args.decode_single, args.decode_images), max(1, args.runs // 2)
    for decoder_name in args.decoder:  # one model and one set of features per decoder, for every beam size
        torch.manual_seed(0)
        run = train.build_run(dict(base, decoder=decoder_name, amp=False), word_map, args.image_size, device)
        features = torch.randn((args.decode_images,) + feature_shape(run, args), device=device)
        decoder, vocab = run.decoder.eval(), Vocabulary(word_map)
        with torch.no_grad():  # an untrained model says <end> at random; this one never does (equal work)
            decoder.fc.bias[word_map["<end>"]] = -1e4
        for k in args.beam_size:
            batched = functools.partial(decode_all, decoder, features, vocab, size, k, args.decode_len)
            with OtherLoad() as load:
                b = timed(batched, device, runs, 1)
                s = timed(functools.partial(decode_all, decoder, features[:single], vocab, 1, k, args.decode_len),
                          device, runs, 1)
            if args.profile and args.out and k == max(args.beam_size):
                profile(args, functools.partial(decode_all, decoder, features[:size], vocab, size, k,
                                                args.decode_len), device, f"decode_{decoder_name}_beam{k}")
            same = batched()[:single] == decode_all(decoder, features[:single], vocab, 1, k, args.decode_len)
            row = {"decoder": decoder_name, "beam": k, "batch": size, "batched_images_per_s": len(features) / b[0],
                   "single_images_per_s": single / s[0], "same_captions": same, "others_cores": load.cores}
            row["speedup"] = row["batched_images_per_s"] / row["single_images_per_s"]
            if isinstance(decoder, TransformerDecoder):  # what its cache saves: the same search, prefix recomputed
                recomputed = functools.partial(decode_all, Recomputed(decoder), features, vocab, size, k,
                                               args.decode_len)
                r = timed(recomputed, device, runs, 1)
                row["recomputed_images_per_s"] = len(features) / r[0]
                row["recomputed_same_captions"] = recomputed() == batched()
                print(f"decode {decoder_name:9s} beam {k}: without its cache (the prefix recomputed at every step) "
                      f"{row['recomputed_images_per_s']:8.1f} img/s, same captions: {row['recomputed_same_captions']}")
            if args.compile_decoding:
                row.update(compiled_decoding(decoder, batched, runs, device))
            rows.append(row)
            print(f"decode {decoder_name:9s} beam {k}: batched {row['batched_images_per_s']:8.1f} img/s, one at a "
                  f"time {row['single_images_per_s']:6.1f} img/s, {row['speedup']:.1f}x, same captions: {same}"
                  f"{load.note}",
                  flush=True)
    return rows


def compiled_decoding(decoder, batched, runs, device):
    """The same batched search with the decoder's step compiled (dynamic shapes: the batch shrinks and
    the Transformer's cache grows): images/s after compilation, the first call's seconds (compilation
    included) and whether the captions are the eager ones."""
    eager, images = batched(), len(batched.args[1])
    step = decoder.step
    decoder.step = torch.compile(step, dynamic=True)
    try:
        t0 = time.perf_counter()
        same = batched() == eager
        first = time.perf_counter() - t0
        med = timed(batched, device, runs, 0)[0]
    finally:
        del decoder.step  # the class's own again
    print(f"  compiled: {images / med:.1f} img/s after {first:.0f} s of compilation, same captions: {same}")
    return {"compiled_images_per_s": images / med, "compile_s": first, "compiled_same_captions": same}


def bench_reward(args, word_map, images=9000, refs=5, batch=32, samples=5):
    """Self-critical training's CIDEr-D reward for one step (batch images x samples captions) against
    a TRAIN-sized corpus of random captions over the vocabulary: milliseconds per step, median."""
    import random

    from metrics import CiderD
    rng = random.Random(0)
    words = range(4, len(word_map))

    def caption():
        return [rng.choice(words) for _ in range(rng.randint(5, args.caption_len))]
    corpus = [[caption() for _ in range(refs)] for _ in range(images)]
    cider = CiderD(corpus)
    candidates = [caption() for _ in range(batch * samples)]
    references = [corpus[i // samples] for i in range(batch * samples)]
    med, lo, hi = timed(lambda: cider.score(candidates, references), torch.device("cpu"), args.runs, 1)
    print(f"reward: CIDEr-D of {batch} images x {samples} samples in {med * 1000:.1f} ms", flush=True)
    return {"images": batch, "samples": samples, "corpus_images": images, "ms": med * 1000, "ms_min": lo * 1000,
            "ms_max": hi * 1000}


def bench_data(args, cfg, dataset):
    """The training DataLoader over real prepared images (uint8, workers as configured)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=max(args.batch_size), shuffle=True, num_workers=cfg["workers"],
                        pin_memory=torch.cuda.is_available(), persistent_workers=False)
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        n += len(batch.image)
        if i == 200:
            break
    rate = n / (time.perf_counter() - t0)
    print(f"data: {rate:.0f} img/s reading {dataset.h5_path} with {cfg['workers']} workers")
    return {"images_per_s": rate, "workers": cfg["workers"], "image_size": dataset.image_size, "images": n}


def markdown(result):
    peak = result.get("matmul_peak_gflop_per_s")
    lines = [f"{result['card']}, torch {result['torch']}, {result['date']}; model: {result['model']}"
             + (f"; an fp32 2048 x 2048 matrix product: {peak:.1f} GFLOP/s" if peak else ""), "",
             "| decoder | precision | encoder | batch (micro x acc) | captions/s (min-max) | GFLOP a step (useful) | "
             "GFLOP/s (of the matmul's) | peak memory MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        if "error" in r:
            lines.append(f"| {r['decoder']} | {r['precision']} | {r['encoder']} | {r['batch']} ({r['micro_batch']} x "
                         f"{r['accumulation']}) | cannot run here: {r['error']} | | | |")
            continue
        per_image = f", {r['captions_per_image']} per image" if r.get("captions_per_image", 1) > 1 else ""
        pool = f", length_pool {r['length_pool']}" if r.get("length_pool") else ""
        work = (f"{r['flop'] / 1e9:.2f} ({r['useful_share']:.0%}) | {r['gflop_per_s']:.1f} ({r['peak_share']:.1%})"
                if "flop" in r else "| ")
        lines.append(f"| {r['decoder']} | {r['precision']} | {r['encoder']} | {r['batch']} ({r['micro_batch']} x "
                     f"{r['accumulation']}{per_image}{pool}) | {r['images_per_s']:.1f} ({r['images_per_s_min']:.1f}-"
                     f"{r['images_per_s_max']:.1f}){busy_note(r.get('others_cores'))} | {work} | "
                     f"{r['peak_memory_mb']:.0f} |")
    compiled = any("compiled_images_per_s" in r for r in result["decoding"])
    lines += ["", "| decoder | beam | batched images/s | one at a time images/s | speed-up | same captions |"
              + (" compiled step images/s (compilation s, same captions) |" if compiled else ""),
              "|---|---|---|---|---|---|" + ("---|" if compiled else "")]
    for r in result["decoding"]:
        lines.append(f"| {r['decoder']} | {r['beam']} | {r['batched_images_per_s']:.1f} | "
                     f"{r['single_images_per_s']:.1f}{busy_note(r.get('others_cores'))} | {r['speedup']:.1f}x | "
                     f"{r['same_captions']} |" + (f" {r['compiled_images_per_s']:.1f} ({r['compile_s']:.0f} s, "
                                                  f"{r['compiled_same_captions']}) |" if compiled else ""))
    r = result["reward"]
    lines += ["", f"CIDEr-D reward (self-critical training) for {r['images']} images x {r['samples']} samples "
              f"against {r['corpus_images']} TRAIN images: {r['ms']:.1f} ms ({r['ms_min']:.1f}-{r['ms_max']:.1f})"]
    if result.get("data"):
        d = result["data"]
        lines += ["", f"DataLoader over prepared {d['image_size']} px images, {d['workers']} workers: "
                  f"{d['images_per_s']:.0f} images/s"]
    return "\n".join(lines)


def main():
    args = parse_args()
    cfg = model_config(args)
    for name in args.decoder:  # before any benchmark: every decoder can write --decode-len words
        check_length(decoder_class(name).longest(cfg), args.decode_len, "--decode-len")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    device = pick_device(args.device)
    if args.data_folder and not args.data_name:
        raise InputError("--data-folder needs --data-name (the base name of the prepared files)")
    data = None
    if args.data_folder:
        from datasets import CaptionDataset
        data = CaptionDataset(args.data_folder, args.data_name, "TRAIN")
        args.caption_len = int(data.caplens.max())
    peak = matmul_peak(device)
    print(f"fp32 matrix product (2048 x 2048): {peak:.1f} GFLOP/s", flush=True)
    torch.backends.cudnn.benchmark = True
    word_map = word_map_of(args.vocab)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.machine()} x{os.cpu_count()} ({torch.get_num_threads()} threads)"
    result = {"card": card, "torch": torch.__version__, "date": date.today().isoformat(),
              "model": f"{cfg['encoder']} stages {cfg['encoder_stages']}, {args.image_size} px, "
                       f"{cfg['encoded_size']}x{cfg['encoded_size']} grid, emb {cfg['emb_dim']}, "
                       f"decoder {cfg['decoder_dim']}, attention {cfg['attention_dim']}, vocab {args.vocab}, "
                       f"captions up to {args.caption_len} tokens",
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "matmul_peak_gflop_per_s": peak}
    result["training"] = bench_training(args, cfg, device, word_map, data, peak)
    result["decoding"] = bench_decoding(args, cfg, device, word_map)
    result["reward"] = bench_reward(args, word_map)
    if args.data_folder:
        result["data"] = bench_data(args, cfg, data)
    print()
    print(markdown(result))
    if args.out:
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
