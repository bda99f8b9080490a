"""Train a captioning decoder (Show and Tell, or Show, Attend and Tell) on prepared data.

    python train.py --decoder attention                                  # the seed: COCO, ResNet-101
    python train.py --decoder rnn --config configs/shapes.yaml --out runs/shapes-rnn
    python train.py --resume runs/shapes-rnn/last.pt --epochs 20         # continue, with more epochs

configs/default.yaml holds every key and its default; --config FILE overlays a YAML file and any
key can be given as --key value. The run folder gets config.yaml, log.jsonl, last.pt and best.pt.
"""
import glob
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import ExitStack, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from datasets import CaptionDataset, load_word_map, to_words
from metrics import corpus_bleu
from models import build_decoder, build_encoder, caption_loss, decode
from utils import (InputError, atomic_path, default_config, dump_yaml, load_checkpoint, merge_config, parse_cli,
                   pick_device, read_yaml, run_cli)


class EpochSampler(Sampler):
    """A permutation drawn from (seed, epoch), read from position `start`: a run resumed in the middle
    of an epoch sees exactly the samples the uninterrupted run would have seen. With `per_image` k > 0
    an epoch visits each image with k of its captions, drawn afresh each epoch, instead of all.

    Under torchrun every rank draws the same permutation and takes every world-th item of it, so the
    ranks' batches together are the batch a single process would take at batch_size x world; the
    incomplete last global batch is dropped, so every rank runs the same number of steps. (It does
    what DistributedSampler does, plus the mid-epoch start and the per-image caption draw.)"""

    def __init__(self, num_images, cpi, seed, per_image=0, batch_size=1, rank=0, world=1):
        self.num_images, self.cpi, self.seed = num_images, cpi, seed
        self.k = per_image if 0 < per_image < cpi else cpi
        self.batch, self.rank, self.world = batch_size, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        if self.k == self.cpi:
            items = torch.arange(self.num_images * self.cpi)
        else:
            pick = torch.rand(self.num_images, self.cpi, generator=g).argsort(1)[:, : self.k]
            items = (torch.arange(self.num_images)[:, None] * self.cpi + pick).flatten()
        items = items[torch.randperm(len(items), generator=g)][self.start:]
        return iter(items[: len(self) * self.world][self.rank :: self.world].tolist())

    def __len__(self):
        whole = self.batch * self.world
        return (self.num_images * self.k - self.start) // whole * self.batch


# Settings that define the model: a resumed run cannot change them.
MODEL_KEYS = ("decoder", "encoder", "encoder_stages", "encoded_size", "coord_channels", "emb_dim", "decoder_dim",
              "attention_dim")


def resolve_config(argv):
    """default.yaml (or the resumed checkpoint's config) <- --config FILE <- --key value."""
    flags, pairs = parse_cli(argv, flags=("overwrite", "help"))
    if "help" in flags:
        print(__doc__)
        sys.exit(0)
    resume, config_file = pairs.pop("resume", None), pairs.pop("config", None)
    ckpt = load_checkpoint(resume) if resume else None
    cfg = merge_config(default_config(), ckpt["config"], resume) if ckpt else default_config()
    if config_file:
        cfg = merge_config(cfg, read_yaml(config_file), config_file)
    cfg = merge_config(cfg, pairs, "command line")
    if ckpt:
        missing = [k for k in ("samples", "decoder_optimizer", "rng", "sums") if k not in ckpt]
        if missing:
            raise InputError(f"{resume} cannot be resumed: it lacks {missing[0]!r} (written by an older train.py, or "
                             "not by train.py); eval.py and caption.py can still use it")
        for key in MODEL_KEYS:
            if cfg[key] != ckpt["config"][key]:
                raise InputError(f"{resume} was trained with {key} {ckpt['config'][key]!r}, the config asks for "
                                 f"{cfg[key]!r}: a resumed run keeps its model; start a new run with --out instead")
    if not cfg["out"]:
        cfg["out"] = os.path.dirname(resume) if resume else os.path.join("runs", cfg["decoder"])
    return cfg, ckpt, "overwrite" in flags


def check_run_folder(cfg, ckpt, overwrite):
    out = cfg["out"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"run folder {out} is a file")
    if ckpt is None and not overwrite:
        for name in ("last.pt", "best.pt"):
            if os.path.exists(os.path.join(out, name)):
                raise InputError(f"{out} already holds a run ({name}): pass --resume {out}/last.pt to "
                                 "continue it, --overwrite to replace it, or --out for a new folder")
    os.makedirs(out, exist_ok=True)
    for stale in glob.glob(os.path.join(out, "*.tmp[0-9]*")):  # left by a killed process
        os.remove(stale)


def setup_distributed(device_name):
    """Under torchrun (LOCAL_RANK set) join the process group, NCCL on CUDA and gloo on CPU, one
    device per process. Returns (rank, local rank, world size, device); a plain run gets (0, 0, 1, device)."""
    if "LOCAL_RANK" not in os.environ:
        return 0, 0, 1, pick_device(device_name)
    local = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), local, dist.get_world_size(), device


def all_sum(x):
    """x summed over the ranks (a new tensor; x itself in a plain run)."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def amp_context(cfg, device):
    """CUDA: autocast in amp_dtype. CPU: bf16 autocast only when asked (fp16 autocast on CPU is slow)."""
    if cfg["amp"] and (device.type == "cuda" or cfg["amp_dtype"] == "bfloat16"):
        return torch.autocast(device.type, dtype=getattr(torch, cfg["amp_dtype"]))
    return nullcontext()


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to save last.pt and exit at the next step boundary; a second
    Ctrl-C exits at once (atomic writes keep the checkpoints on disk whole either way)."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving last.pt at the end of this step "
              "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def agreed(self, device):
        """Whether any rank was asked to stop: every rank must stop at the same step."""
        if not dist.is_initialized():
            return self.signum is not None
        flag = torch.tensor([float(self.signum is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops at a step boundary:
    a terminal's Ctrl-C reaches the whole process group, and a worker that died of it would abort the
    run before last.pt is saved. They exit when the main process closes the loader or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Stopped(Exception):
    """Raised after last.pt is saved because of a stop request."""


class Trainer:
    """Models, optimisers and the counters that a checkpoint saves and --resume restores."""

    def __init__(self, cfg, ckpt, word_map, image_size, device, rank=0, world=1):
        self.cfg, self.word_map, self.image_size, self.device = cfg, word_map, image_size, device
        self.rank, self.world = rank, world
        # A resumed run takes its encoder weights from the checkpoint, never from a download.
        enc_cfg = dict(cfg, encoder_weights="none") if ckpt else cfg
        self.encoder = build_encoder(enc_cfg)
        self.decoder = build_decoder(cfg, len(word_map), self.encoder.dim)
        if ckpt:
            self.encoder.load_state_dict(ckpt["encoder"])
            self.decoder.load_state_dict(ckpt["decoder"])
        self.encoder.fine_tune(cfg["fine_tune_encoder"])
        if dist.is_initialized() and device.type == "cuda":
            # The plain decoder's BatchNorm (initial state) then normalises over the global batch, as a
            # single process at batch_size x world would. SyncBatchNorm has no CPU kernel: on gloo each
            # rank normalises over its own batch_size images, and DDP copies rank 0's running
            # statistics to the others at every forward, so evaluation still sees one set.
            self.decoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.decoder)
        self.encoder.to(device)
        self.decoder.to(device)
        if device.type == "cuda":
            self.encoder.to(memory_format=torch.channels_last)
        # What the training step calls: DDP wrappers under torchrun (they average the gradients).
        self.train_encoder, self.train_decoder = self.encoder, self.decoder
        if dist.is_initialized():
            self.train_decoder = DistributedDataParallel(self.decoder)
            if not self.encoder.frozen:
                self.train_encoder = DistributedDataParallel(self.encoder)
        self.dec_opt = torch.optim.Adam(self.decoder.parameters(), lr=cfg["decoder_lr"])
        self.enc_opt = None
        if cfg["fine_tune_encoder"]:
            params = [p for p in self.encoder.parameters() if p.requires_grad]
            self.enc_opt = torch.optim.Adam(params, lr=cfg["encoder_lr"])
        self.params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]  # for clipping
        use_scaler = device.type == "cuda" and cfg["amp"] and cfg["amp_dtype"] == "float16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.epoch, self.samples, self.step = 0, 0, 0  # samples: captions all ranks took in this epoch
        self.best, self.bad_epochs, self.log_lines = [-math.inf, -math.inf], 0, 0
        self.skipped, self.nonfinite_run = 0, 0  # steps skipped for a non-finite gradient: all, in a row
        self.sums = torch.zeros(4, dtype=torch.float64)  # this epoch's training loss sums so far
        self.window = torch.zeros(4, dtype=torch.float64)  # and since the last log line
        if ckpt:
            self.dec_opt.load_state_dict(ckpt["decoder_optimizer"])
            # Fine-tuning switched on at resume starts a fresh encoder optimiser.
            if self.enc_opt and ckpt.get("encoder_optimizer"):
                self.enc_opt.load_state_dict(ckpt["encoder_optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            for k in ("epoch", "samples", "step", "best", "bad_epochs", "log_lines", "skipped"):
                setattr(self, k, ckpt[k])
            if rank == 0:  # the saved sums are global: the other ranks add theirs from zero
                self.sums, self.window = ckpt["sums"], ckpt["window"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            random.setstate(ckpt["rng"]["python"])
            if rank:  # different dropout masks on every rank
                torch.manual_seed(cfg["seed"] + 1000003 * rank + self.step)

    def features(self, x, train=False):
        """Encoder features of a batch of uint8 images, or a batch of cached features as they are."""
        if x.dtype != torch.uint8:
            return x.float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder.frozen):
            return (self.train_encoder if train else self.encoder)(x)

    @property
    def optimizers(self):
        return [o for o in (self.dec_opt, self.enc_opt) if o is not None]

    def save(self, path, sums, window):
        """Write a checkpoint (rank 0 only); `sums` and `window` are the global loss sums."""
        if self.rank:
            return
        ckpt = {
            "config": self.cfg, "word_map": self.word_map, "image_size": self.image_size,
            "encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
            "decoder_optimizer": self.dec_opt.state_dict(),
            "encoder_optimizer": self.enc_opt.state_dict() if self.enc_opt else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "samples": self.samples, "step": self.step, "best": self.best,
            "bad_epochs": self.bad_epochs, "log_lines": self.log_lines, "skipped": self.skipped,
            "sums": sums.cpu(), "window": window.cpu(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)


class Log:
    """log.jsonl, one JSON object per line, written by rank 0 only. On resume it is cut back to what
    the checkpoint had seen, so a run resumed after a crash has no duplicated lines."""

    def __init__(self, path, keep_lines, writer=None, enabled=True):
        self.path, self.writer, self.enabled, self.lines = path, writer, enabled, 0
        if not enabled:
            return
        lines = []
        if keep_lines and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()[:keep_lines]
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(lines)
        self.lines = len(lines)

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.writer:
            step = record["step"]
            for k, v in record.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{record['kind']}/{k}", v, step)


def tensorboard_writer(cfg):
    if not cfg["tensorboard"]:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard: true, but the tensorboard package is not installed; logging to log.jsonl only")
        return None
    return SummaryWriter(cfg["out"])


@torch.no_grad()
def feature_cache(t, dataset, amp):
    """Encode every image of a split once with the frozen encoder, into a float16 .npy file under
    {data_folder}/cache/ named by a hash of the encoder's weights and settings: later epochs, and
    later runs with the same encoder, read features instead of running the encoder again."""
    cfg, encoder = t.cfg, t.encoder.eval()
    images_file = os.stat(dataset.h5_path)  # prepared again means cached again
    key = hashlib.sha1(repr([cfg[k] for k in ("encoder", "encoder_stages", "encoded_size", "coord_channels")]
                            + [dataset.h5_path, images_file.st_size, images_file.st_mtime_ns]).encode())
    for name, value in encoder.state_dict().items():
        key.update(name.encode() + value.cpu().numpy().tobytes())
    path = os.path.join(cfg["data_folder"], "cache", f"{dataset.split}_{cfg['data_name']}_{key.hexdigest()[:12]}.npy")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images, n, size = dataset._images(), dataset.num_images, cfg["batch_size"]
    shape = (n,) + tuple(t.features(torch.from_numpy(images[:1]).to(t.device)).shape[1:])
    need, free = 2 * math.prod(shape), shutil.disk_usage(os.path.dirname(path)).free
    if need > 0.9 * free:
        raise InputError(f"caching {dataset.split} features needs {need / 2**30:.1f} GiB in {os.path.dirname(path)}, "
                         f"{free / 2**30:.1f} GiB are free: free some, or set cache_features: false")
    with atomic_path(path) as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        for s in tqdm(range(0, n, size), desc=f"cache {dataset.split} features", unit="batch", leave=False):
            with amp:
                cache[s:s + size] = t.features(torch.from_numpy(images[s:s + size]).to(t.device)).float().cpu().numpy()
        cache.flush()
        del cache
    print(f"cached {dataset.split} encoder features: {path} ({os.path.getsize(path) / 2**20:.0f} MiB)")
    return path


def batches_in_groups(loader, size):
    """Micro-batches grouped for one optimiser step each."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train_step(t, group, amp):
    """One optimiser step over a group of micro-batches (gradient accumulation). Returns this rank's
    sums of (loss x tokens, cross-entropy, top-5 hits, tokens) on the device, zero for a skipped step."""
    cfg, device = t.cfg, t.device
    alpha_c = cfg["alpha_c"] if cfg["decoder"] == "attention" else 0.0
    # Normalise by the tokens and images of the whole group (on all ranks), so N micro-batches on W
    # ranks give exactly the gradient of one batch N x W times larger (DDP averages over the ranks).
    tokens = sum(int((b[2] - 1).sum()) for b in group)
    images = sum(len(b[0]) for b in group)
    if dist.is_initialized():
        counts = all_sum(torch.tensor([tokens, images], dtype=torch.float32, device=device)) / t.world
        tokens, images = counts[0], counts[1]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for i, (imgs, caps, lens) in enumerate(group):
        imgs = imgs.to(device, non_blocking=True)
        caps, lens = caps.to(device, non_blocking=True), lens.to(device, non_blocking=True)
        with ExitStack() as stack:
            if i < len(group) - 1:  # all-reduce the gradients once per step, not per micro-batch
                for m in (t.train_encoder, t.train_decoder):
                    if isinstance(m, DistributedDataParallel):
                        stack.enter_context(m.no_sync())
            with amp:
                logits, alphas = t.train_decoder(t.features(imgs, train=True), caps, lens)
                loss, ce_sum, hits, n = caption_loss(logits, alphas, caps, lens, alpha_c, tokens, images)
            t.scaler.scale(loss).backward()
        sums += torch.stack([loss.detach() * tokens, ce_sum, hits.float(), n.float()]).double()
    for opt in t.optimizers:
        t.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(t.params, cfg["grad_clip"] or math.inf)
    if t.scaler.is_enabled():  # the fp16 scaler skips non-finite steps itself, and lowers its scale
        for opt in t.optimizers:
            t.scaler.step(opt)
        t.scaler.update()
        finite = True
    else:  # one host sync per optimiser step, none inside the word loop
        finite = bool(torch.isfinite(norm))
        if finite:
            for opt in t.optimizers:
                opt.step()
    for opt in t.optimizers:
        opt.zero_grad(set_to_none=True)
    t.step += 1
    t.samples += len(group) * cfg["batch_size"] * t.world
    if finite:
        t.nonfinite_run = 0
        return sums
    t.skipped += 1
    t.nonfinite_run += 1
    if t.nonfinite_run >= cfg["max_nonfinite_steps"]:
        raise InputError(f"the loss or its gradient was not finite for {t.nonfinite_run} steps in a row (up to "
                         f"step {t.step}); nothing was stepped on them. Lower decoder_lr (now {cfg['decoder_lr']}) "
                         "or look for broken data; last.pt and best.pt hold the last good weights")
    return sums.zero_()


def train_epoch(t, loader, log, amp, stop):
    cfg, device, world = t.cfg, t.device, t.world
    t.encoder.train()
    t.decoder.train()
    if t.samples == 0:  # a run resumed mid-epoch keeps the sums of the part before
        t.sums, t.window = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    sums = t.sums.to(device)  # loss x tokens, ce sum, top-5 hits, tokens: synced only to log
    window = t.window.to(device)  # the same since the last log line
    images_seen, t0 = 0, time.time()
    # A context manager, so that an error (out of memory, a stop) clears the bar before its message.
    with tqdm(total=len(loader), desc=f"train {t.epoch + 1}/{cfg['epochs']}", unit="batch", leave=False,
              disable=t.rank > 0) as bar:
        for group in batches_in_groups(loader, cfg["accumulation_steps"]):
            step_sums = train_step(t, group, amp)
            sums += step_sums
            window += step_sums
            images_seen += sum(len(b[0]) for b in group) * world
            bar.update(len(group))
            if t.step % cfg["log_every"] == 0:
                loss_sum, ce, hits, tokens = all_sum(window).tolist()
                window.zero_()
                rate = images_seen / (time.time() - t0)
                record = {"kind": "step", "epoch": t.epoch + 1, "step": t.step, "lr": t.dec_opt.param_groups[0]["lr"],
                          "images_per_s": rate, "skipped_steps": t.skipped}
                if tokens:  # else every step since the last line was skipped
                    record.update(loss=loss_sum / tokens, ce=ce / tokens, top5=hits / tokens)
                    bar.set_postfix(loss=f"{ce / tokens:.3f}", top5=f"{hits / tokens:.3f}", img_s=f"{rate:.0f}")
                log.write(record)
            at_max = cfg["max_steps"] and t.step >= cfg["max_steps"]
            stopping = stop.agreed(device)
            if at_max or stopping or cfg["checkpoint_every"] and t.step % cfg["checkpoint_every"] == 0:
                t.log_lines = log.lines
                t.save(os.path.join(cfg["out"], "last.pt"), all_sum(sums), all_sum(window))
            if stopping:
                raise Stopped
            if at_max:
                return None
    t.sums, t.window = all_sum(sums).cpu(), all_sum(window).cpu()
    loss_sum, ce, hits, tokens = t.sums.tolist()
    return {"train_loss": loss_sum / max(tokens, 1), "train_ce": ce / max(tokens, 1),
            "train_top5": hits / max(tokens, 1), "images_per_s": images_seen / (time.time() - t0)}


@torch.no_grad()
def validate(t, loader, amp, stop):
    """Teacher-forced loss and top-5 over every reference caption, and BLEU-4 of real decoding; under
    torchrun each rank takes its shard of the split and the results are gathered, so every rank gets
    the same numbers (and takes the same early-stopping decision). None when a single process is
    asked to stop; under torchrun, and after the last batch, train_loop stops once the epoch is saved."""
    cfg, device = t.cfg, t.device
    t.encoder.eval()
    t.decoder.eval()
    rev = {v: k for k, v in t.word_map.items()}
    alpha_c = cfg["alpha_c"] if cfg["decoder"] == "attention" else 0.0
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    references, hypotheses = [], []
    for images, _, _, all_captions, _ in tqdm(loader, desc="validate", unit="batch", leave=False, disable=t.rank > 0):
        if not dist.is_initialized() and stop.signum is not None:  # under torchrun the stop waits for the end
            return None
        images, all_captions = images.to(device), all_captions.to(device)
        with amp:
            features = t.features(images)
            cpi = all_captions.size(1)
            captions = all_captions.flatten(0, 1)
            lengths = (captions != t.word_map["<pad>"]).sum(1)
            logits, alphas = t.decoder(features.repeat_interleave(cpi, 0), captions, lengths)
            _, ce_sum, hits, tokens = caption_loss(logits, alphas, captions, lengths, alpha_c)
            out = decode(t.decoder, features, t.word_map, cfg["val_beam_size"], cfg["max_decode_len"])
        sums += torch.stack([ce_sum, hits.float(), tokens.float()]).double()
        hypotheses += [to_words(s, rev) for s in out.seqs]
        references += [[to_words(c, rev) for c in caps] for caps in all_captions.tolist()]
    if dist.is_initialized():
        shards = [None] * t.world
        dist.all_gather_object(shards, (references, hypotheses))
        references = [r for refs, _ in shards for r in refs]
        hypotheses = [h for _, hyps in shards for h in hyps]
    ce, hits, tokens = all_sum(sums).tolist()
    return {"val_loss": ce / tokens, "val_top5": hits / tokens, "val_bleu4": corpus_bleu(references, hypotheses)}


def check_ranks_agree(t):
    """DDP keeps the replicas equal; a rank that drifted (different data, a non-deterministic op that
    changed a branch) would make the saved rank-0 weights a lie, so say so rather than finish quietly."""
    flat = torch.cat([p.detach().double().flatten() for m in (t.encoder, t.decoder) for p in m.parameters()])
    spread = torch.stack([flat, -flat])
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    if not torch.equal(spread[0], -spread[1]):
        raise RuntimeError(f"the {t.world} ranks ended with different parameters "
                           f"(largest difference {(spread[0] + spread[1]).abs().max().item():.3g})")


def finite_weights(t):
    return all(bool(torch.isfinite(p).all()) for m in (t.encoder, t.decoder) for p in m.parameters())


def main():
    cfg, ckpt, overwrite = resolve_config(sys.argv[1:])
    rank, local_rank, world, device = setup_distributed(cfg["device"])
    say = print if rank == 0 else (lambda *a, **k: None)
    word_map = load_word_map(cfg["data_folder"], cfg["data_name"])
    if ckpt and ckpt["word_map"] != word_map:
        raise InputError(f"the checkpoint's word map ({len(ckpt['word_map'])} words) differs from "
                         f"{cfg['data_folder']}/WORDMAP_{cfg['data_name']}.json ({len(word_map)} words)")
    train_set = CaptionDataset(cfg["data_folder"], cfg["data_name"], "TRAIN")
    val_set = CaptionDataset(cfg["data_folder"], cfg["data_name"], "VAL")
    val_images = min(cfg["val_max_images"] or len(val_set), len(val_set))
    if rank == 0:
        check_run_folder(cfg, ckpt, overwrite)
        say(json.dumps(cfg, indent=1))
        dump_yaml(cfg, os.path.join(cfg["out"], "config.yaml"))

    torch.manual_seed(cfg["seed"] + 1000003 * rank)  # rank 0 draws what a single process draws
    random.seed(cfg["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t = Trainer(cfg, ckpt, word_map, train_set.image_size, device, rank, world)
    if cfg["cache_features"] is True and cfg["fine_tune_encoder"]:
        raise InputError("cache_features: true needs a frozen encoder (fine_tune_encoder: false)")
    amp = amp_context(cfg, device)
    if cfg["cache_features"] is True or cfg["cache_features"] == "auto" and t.encoder.frozen:
        if dist.is_initialized() and local_rank:  # one process per machine writes the cache, the others wait
            dist.barrier()
        train_set.use_features(feature_cache(t, train_set, amp))
        val_set.use_features(feature_cache(t, val_set, amp))
        if dist.is_initialized() and not local_rank:
            dist.barrier()
    log = Log(os.path.join(cfg["out"], "log.jsonl"), t.log_lines if ckpt else 0, tensorboard_writer(cfg) if rank == 0
              else None, enabled=rank == 0)
    pin = device.type == "cuda"
    sampler = EpochSampler(train_set.num_images, train_set.cpi, cfg["seed"], cfg["train_captions_per_image"],
                           cfg["batch_size"], rank, world)
    loader_rng = torch.Generator().manual_seed(cfg["seed"] + rank)  # worker seeds, kept off the global RNG
    train_loader = DataLoader(train_set, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["workers"],
                              pin_memory=pin, generator=loader_rng, persistent_workers=cfg["workers"] > 0,
                              worker_init_fn=ignore_stop_signals)
    val_loader = DataLoader(Subset(val_set, range(rank, val_images, world)), batch_size=cfg["batch_size"],
                            num_workers=cfg["workers"], pin_memory=pin, worker_init_fn=ignore_stop_signals)
    if len(sampler) == 0:
        raise InputError(f"an epoch has fewer TRAIN captions than one batch ({cfg['batch_size']} x {world} processes)")

    stop = StopRequest()
    try:
        train_loop(t, train_loader, val_loader, sampler, log, amp, stop, say)
        if dist.is_initialized():
            check_ranks_agree(t)
            say(f"ranks agree: identical parameters on all {t.world} processes")
    except Stopped:
        say(f"{signal.Signals(stop.signum).name if stop.signum else 'stop'}: saved {cfg['out']}/last.pt at step "
            f"{t.step}; continue with --resume {cfg['out']}/last.pt", file=sys.stderr)
        sys.exit(128 + (stop.signum or signal.SIGINT))
    except torch.OutOfMemoryError:
        bs, acc = cfg["batch_size"], cfg["accumulation_steps"]
        raise InputError(f"out of memory on {device} at batch_size {bs}: lower it and raise accumulation_steps to "
                         f"keep the effective batch, e.g. --batch_size {max(bs // 2, 1)} --accumulation_steps {acc * 2}"
                         ) from None
    finally:
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def train_loop(t, train_loader, val_loader, sampler, log, amp, stop, say):
    cfg, device = t.cfg, t.device
    out = cfg["out"]
    while t.epoch < cfg["epochs"]:
        if cfg["patience"] and t.bad_epochs >= cfg["patience"]:
            break
        sampler.set_epoch(t.epoch, t.samples)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        stats = train_epoch(t, train_loader, log, amp, stop)
        if stats is None:
            say(f"stopped at max_steps {cfg['max_steps']}; continue with --resume {out}/last.pt "
                "--max_steps 0 (or a larger max_steps)")
            return
        val = validate(t, val_loader, amp, stop)
        if val is None:  # asked to stop during validation: the epoch's training part is kept
            t.log_lines = log.lines
            t.save(os.path.join(out, "last.pt"), t.sums, t.window)
            raise Stopped
        stats.update(val)
        # BLEU-4 first, validation loss to break ties: early on BLEU-4 is often 0 for several epochs
        # while the loss is still falling, and that is progress. NaN never compares as an improvement.
        score = [stats["val_bleu4"], -stats["val_loss"]]
        if cfg["early_stop_metric"] == "loss":
            score = score[::-1]
        improved = score > t.best and finite_weights(t)
        t.best, t.bad_epochs = (score, 0) if improved else (t.best, t.bad_epochs + 1)
        if not improved and cfg["lr_decay_patience"] and t.bad_epochs % cfg["lr_decay_patience"] == 0:
            for opt in t.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= cfg["lr_decay_factor"]
        t.epoch, t.samples = t.epoch + 1, 0
        log.write({"kind": "epoch", "epoch": t.epoch, "step": t.step, **stats,
                   "lr": t.dec_opt.param_groups[0]["lr"], "epoch_time_s": time.time() - t0,
                   "peak_memory_mb": peak_memory_mb(device), "skipped_steps": t.skipped, "best": improved})
        t.log_lines = log.lines
        t.save(os.path.join(out, "last.pt"), t.sums, t.window)
        if improved:
            t.save(os.path.join(out, "best.pt"), t.sums, t.window)
        say(f"epoch {t.epoch}: train loss {stats['train_loss']:.3f}, val loss {stats['val_loss']:.3f}, "
            f"top-5 {stats['val_top5']:.2%}, BLEU-4 {stats['val_bleu4']:.4f}"
            f"{' (best)' if improved else ''}, {time.time() - t0:.0f} s, {stats['images_per_s']:.0f} img/s")
        if stop.agreed(device):
            raise Stopped
    if cfg["patience"] and t.bad_epochs >= cfg["patience"]:
        say(f"early stop: no improvement of {cfg['early_stop_metric']} for {t.bad_epochs} epochs "
            f"(patience {cfg['patience']}); best checkpoint in {out}/best.pt")
    say(f"done: {t.epoch} epochs, run folder {out}")


if __name__ == "__main__":
    run_cli(main)
