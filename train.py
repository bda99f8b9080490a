"""Train a captioning decoder (Show and Tell, or Show, Attend and Tell) on prepared data.

    python train.py --decoder attention                                  # the seed: COCO, ResNet-101
    python train.py --decoder rnn --config configs/shapes.yaml --out runs/shapes-rnn
    python train.py --resume runs/shapes-rnn/last.pt --epochs 20         # continue, with more epochs

configs/default.yaml holds every key and its default; --config FILE overlays a YAML file and any
key can be given as --key value. The run folder gets config.yaml, log.jsonl, last.pt and best.pt.
"""
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import numpy as np
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
    an epoch visits each image with k of its captions, drawn afresh each epoch, instead of all."""

    def __init__(self, num_images, cpi, seed, per_image=0):
        self.num_images, self.cpi, self.seed = num_images, cpi, seed
        self.k = per_image if 0 < per_image < cpi else cpi
        self.epoch, self.start = 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        if self.k == self.cpi:
            items = torch.arange(self.num_images * self.cpi)
        else:
            pick = torch.rand(self.num_images, self.cpi, generator=g).argsort(1)[:, : self.k]
            items = (torch.arange(self.num_images)[:, None] * self.cpi + pick).flatten()
        return iter(items[torch.randperm(len(items), generator=g)][self.start:].tolist())

    def __len__(self):
        return self.num_images * self.k - self.start


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


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def amp_context(cfg, device):
    """CUDA: autocast in amp_dtype. CPU: bf16 autocast only when asked (fp16 autocast on CPU is slow)."""
    if cfg["amp"] and (device.type == "cuda" or cfg["amp_dtype"] == "bfloat16"):
        return torch.autocast(device.type, dtype=getattr(torch, cfg["amp_dtype"]))
    return nullcontext()


class Trainer:
    """Models, optimisers and the counters that a checkpoint saves and --resume restores."""

    def __init__(self, cfg, ckpt, word_map, image_size, device):
        self.cfg, self.word_map, self.image_size, self.device = cfg, word_map, image_size, device
        # A resumed run takes its encoder weights from the checkpoint, never from a download.
        enc_cfg = dict(cfg, encoder_weights="none") if ckpt else cfg
        self.encoder = build_encoder(enc_cfg)
        self.decoder = build_decoder(cfg, len(word_map), self.encoder.dim)
        if ckpt:
            self.encoder.load_state_dict(ckpt["encoder"])
            self.decoder.load_state_dict(ckpt["decoder"])
        self.encoder.fine_tune(cfg["fine_tune_encoder"])
        self.encoder.to(device)
        self.decoder.to(device)
        if device.type == "cuda":
            self.encoder.to(memory_format=torch.channels_last)
        self.dec_opt = torch.optim.Adam(self.decoder.parameters(), lr=cfg["decoder_lr"])
        self.enc_opt = None
        if cfg["fine_tune_encoder"]:
            params = [p for p in self.encoder.parameters() if p.requires_grad]
            self.enc_opt = torch.optim.Adam(params, lr=cfg["encoder_lr"])
        use_scaler = device.type == "cuda" and cfg["amp"] and cfg["amp_dtype"] == "float16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.epoch, self.micro, self.step = 0, 0, 0  # micro: micro-batches done in this epoch
        self.best, self.bad_epochs, self.log_lines = [-math.inf, -math.inf], 0, 0
        self.sums = torch.zeros(4, dtype=torch.float64)  # this epoch's training loss sums so far
        self.window = torch.zeros(4, dtype=torch.float64)  # and since the last log line
        if ckpt:
            self.dec_opt.load_state_dict(ckpt["decoder_optimizer"])
            # Fine-tuning switched on at resume starts a fresh encoder optimiser.
            if self.enc_opt and ckpt.get("encoder_optimizer"):
                self.enc_opt.load_state_dict(ckpt["encoder_optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            for k in ("epoch", "micro", "step", "best", "bad_epochs", "log_lines", "sums", "window"):
                setattr(self, k, ckpt[k])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            random.setstate(ckpt["rng"]["python"])

    def features(self, x):
        """Encoder features of a batch of uint8 images, or a batch of cached features as they are."""
        if x.dtype != torch.uint8:
            return x.float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder.frozen):
            return self.encoder(x)

    @property
    def optimizers(self):
        return [o for o in (self.dec_opt, self.enc_opt) if o is not None]

    def save(self, path):
        ckpt = {
            "config": self.cfg, "word_map": self.word_map, "image_size": self.image_size,
            "encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
            "decoder_optimizer": self.dec_opt.state_dict(),
            "encoder_optimizer": self.enc_opt.state_dict() if self.enc_opt else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "micro": self.micro, "step": self.step, "best": self.best,
            "bad_epochs": self.bad_epochs, "log_lines": self.log_lines, "sums": self.sums, "window": self.window,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)


class Log:
    """log.jsonl, one JSON object per line. On resume it is cut back to what the checkpoint had
    seen, so a run resumed after a crash has no duplicated lines."""

    def __init__(self, path, keep_lines, writer=None):
        self.path, self.writer = path, writer
        lines = []
        if keep_lines and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()[:keep_lines]
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(lines)
        self.lines = len(lines)

    def write(self, record):
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


def train_epoch(t, loader, log, amp):
    cfg, device = t.cfg, t.device
    t.encoder.train()
    t.decoder.train()
    alpha_c = cfg["alpha_c"] if cfg["decoder"] == "attention" else 0.0
    params = [p for p in list(t.encoder.parameters()) + list(t.decoder.parameters()) if p.requires_grad]
    if t.micro == 0:  # a run resumed mid-epoch keeps the sums of the part before
        t.sums, t.window = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    sums = t.sums.to(device)  # loss x tokens, ce sum, top-5 hits, tokens: synced only to log
    window = t.window.to(device)  # the same since the last log line
    images_seen, t0 = 0, time.time()
    bar = tqdm(total=len(loader), desc=f"train {t.epoch + 1}/{cfg['epochs']}", unit="batch", leave=False)
    for group in batches_in_groups(loader, cfg["accumulation_steps"]):
        # Normalise by the tokens and images of the whole group, so N micro-batches give exactly the
        # gradient of one batch N times larger.
        group_tokens = sum(int((b[2] - 1).sum()) for b in group)
        group_images = sum(len(b[0]) for b in group)
        for images, captions, caplens in group:
            images = images.to(device, non_blocking=True)
            captions, caplens = captions.to(device, non_blocking=True), caplens.to(device, non_blocking=True)
            with amp:
                features = t.features(images)
                logits, alphas = t.decoder(features, captions, caplens)
                loss, ce_sum, hits, tokens = caption_loss(logits, alphas, captions, caplens, alpha_c,
                                                          group_tokens, group_images)
            t.scaler.scale(loss).backward()
            step_sums = torch.stack([loss.detach() * group_tokens, ce_sum, hits.float(), tokens.float()]).double()
            sums += step_sums
            window += step_sums
            images_seen += len(images)
            bar.update(1)
        for opt in t.optimizers:
            t.scaler.unscale_(opt)
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        for opt in t.optimizers:
            t.scaler.step(opt)
        t.scaler.update()
        for opt in t.optimizers:
            opt.zero_grad(set_to_none=True)
        t.micro += len(group)
        t.step += 1
        if t.step % cfg["log_every"] == 0:
            loss_sum, ce, hits, tokens = window.tolist()
            window.zero_()
            rate = images_seen / (time.time() - t0)
            log.write({"kind": "step", "epoch": t.epoch + 1, "step": t.step, "loss": loss_sum / tokens,
                       "ce": ce / tokens, "top5": hits / tokens, "lr": t.dec_opt.param_groups[0]["lr"],
                       "images_per_s": rate})
            bar.set_postfix(loss=f"{ce / tokens:.3f}", top5=f"{hits / tokens:.3f}", img_s=f"{rate:.0f}")
        stop = cfg["max_steps"] and t.step >= cfg["max_steps"]
        if stop or cfg["checkpoint_every"] and t.step % cfg["checkpoint_every"] == 0:
            t.sums, t.window, t.log_lines = sums.cpu(), window.cpu(), log.lines
            t.save(os.path.join(cfg["out"], "last.pt"))
        if stop:
            bar.close()
            return None
    bar.close()
    loss_sum, ce, hits, tokens = sums.tolist()
    return {"train_loss": loss_sum / max(tokens, 1), "train_ce": ce / max(tokens, 1),
            "train_top5": hits / max(tokens, 1), "images_per_s": images_seen / (time.time() - t0)}


@torch.no_grad()
def validate(t, loader, amp):
    """Teacher-forced loss and top-5 over every reference caption, and BLEU-4 of real decoding."""
    cfg, device = t.cfg, t.device
    t.encoder.eval()
    t.decoder.eval()
    rev = {v: k for k, v in t.word_map.items()}
    alpha_c = cfg["alpha_c"] if cfg["decoder"] == "attention" else 0.0
    sums = torch.zeros(3, device=device)
    references, hypotheses = [], []
    for images, _, _, all_captions, _ in tqdm(loader, desc="validate", unit="batch", leave=False):
        images, all_captions = images.to(device), all_captions.to(device)
        with amp:
            features = t.features(images)
            cpi = all_captions.size(1)
            captions = all_captions.flatten(0, 1)
            lengths = (captions != t.word_map["<pad>"]).sum(1)
            logits, alphas = t.decoder(features.repeat_interleave(cpi, 0), captions, lengths)
            _, ce_sum, hits, tokens = caption_loss(logits, alphas, captions, lengths, alpha_c)
            out = decode(t.decoder, features, t.word_map, cfg["val_beam_size"], cfg["max_decode_len"])
        sums += torch.stack([ce_sum, hits.float(), tokens.float()])
        hypotheses += [to_words(s, rev) for s in out.seqs]
        references += [[to_words(c, rev) for c in caps] for caps in all_captions.tolist()]
    ce, hits, tokens = sums.tolist()
    return {"val_loss": ce / tokens, "val_top5": hits / tokens, "val_bleu4": corpus_bleu(references, hypotheses)}


def main():
    cfg, ckpt, overwrite = resolve_config(sys.argv[1:])
    device = pick_device(cfg["device"])
    word_map = load_word_map(cfg["data_folder"], cfg["data_name"])
    if ckpt and ckpt["word_map"] != word_map:
        raise InputError(f"the checkpoint's word map ({len(ckpt['word_map'])} words) differs from "
                         f"{cfg['data_folder']}/WORDMAP_{cfg['data_name']}.json ({len(word_map)} words)")
    train_set = CaptionDataset(cfg["data_folder"], cfg["data_name"], "TRAIN")
    val_set = CaptionDataset(cfg["data_folder"], cfg["data_name"], "VAL")
    if cfg["val_max_images"]:
        val_set = Subset(val_set, range(min(cfg["val_max_images"], len(val_set))))
    check_run_folder(cfg, ckpt, overwrite)
    print(json.dumps(cfg, indent=1))
    dump_yaml(cfg, os.path.join(cfg["out"], "config.yaml"))

    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t = Trainer(cfg, ckpt, word_map, train_set.image_size, device)
    if cfg["cache_features"] is True and cfg["fine_tune_encoder"]:
        raise InputError("cache_features: true needs a frozen encoder (fine_tune_encoder: false)")
    if cfg["cache_features"] is True or cfg["cache_features"] == "auto" and t.encoder.frozen:
        amp = amp_context(cfg, device)
        train_set.use_features(feature_cache(t, train_set, amp))
        val_base = val_set.dataset if isinstance(val_set, Subset) else val_set
        val_base.use_features(feature_cache(t, val_base, amp))
    log = Log(os.path.join(cfg["out"], "log.jsonl"), t.log_lines if ckpt else 0, tensorboard_writer(cfg))
    amp = amp_context(cfg, device)
    pin = device.type == "cuda"
    sampler = EpochSampler(train_set.num_images, train_set.cpi, cfg["seed"], cfg["train_captions_per_image"])
    loader_rng = torch.Generator().manual_seed(cfg["seed"])  # worker seeds, kept off the global RNG
    train_loader = DataLoader(train_set, batch_size=cfg["batch_size"], sampler=sampler, drop_last=True,
                              num_workers=cfg["workers"], pin_memory=pin, generator=loader_rng,
                              persistent_workers=cfg["workers"] > 0)
    val_loader = DataLoader(val_set, batch_size=cfg["batch_size"], num_workers=cfg["workers"], pin_memory=pin)
    if len(sampler) < cfg["batch_size"]:
        raise InputError(f"an epoch has {len(sampler)} TRAIN captions, fewer than batch_size {cfg['batch_size']}")

    while t.epoch < cfg["epochs"]:
        if cfg["patience"] and t.bad_epochs >= cfg["patience"]:
            break
        sampler.epoch, sampler.start = t.epoch, t.micro * cfg["batch_size"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        stats = train_epoch(t, train_loader, log, amp)
        if stats is None:
            print(f"stopped at max_steps {cfg['max_steps']}; continue with --resume {cfg['out']}/last.pt "
                  "--max_steps 0 (or a larger max_steps)")
            return
        stats.update(validate(t, val_loader, amp))
        # BLEU-4 first, validation loss to break ties: early on BLEU-4 is often 0 for several epochs
        # while the loss is still falling, and that is progress.
        score = [stats["val_bleu4"], -stats["val_loss"]]
        if cfg["early_stop_metric"] == "loss":
            score = score[::-1]
        improved = score > t.best
        t.best, t.bad_epochs = (score, 0) if improved else (t.best, t.bad_epochs + 1)
        if not improved and cfg["lr_decay_patience"] and t.bad_epochs % cfg["lr_decay_patience"] == 0:
            for opt in t.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= cfg["lr_decay_factor"]
        t.epoch, t.micro = t.epoch + 1, 0
        log.write({"kind": "epoch", "epoch": t.epoch, "step": t.step, **stats,
                   "lr": t.dec_opt.param_groups[0]["lr"], "epoch_time_s": time.time() - t0,
                   "peak_memory_mb": peak_memory_mb(device), "best": improved})
        t.log_lines = log.lines
        t.save(os.path.join(cfg["out"], "last.pt"))
        if improved:
            t.save(os.path.join(cfg["out"], "best.pt"))
        print(f"epoch {t.epoch}: train loss {stats['train_loss']:.3f}, val loss {stats['val_loss']:.3f}, "
              f"top-5 {stats['val_top5']:.2%}, BLEU-4 {stats['val_bleu4']:.4f}"
              f"{' (best)' if improved else ''}, {time.time() - t0:.0f} s, {stats['images_per_s']:.0f} img/s")
    if cfg["patience"] and t.bad_epochs >= cfg["patience"]:
        print(f"early stop: no improvement of {cfg['early_stop_metric']} for {t.bad_epochs} epochs "
              f"(patience {cfg['patience']}); best checkpoint in {cfg['out']}/best.pt")
    print(f"done: {t.epoch} epochs, run folder {cfg['out']}")


if __name__ == "__main__":
    run_cli(main)
