"""Train a captioning decoder (Show and Tell, Show, Attend and Tell, or a Transformer) on prepared data.

    python train.py --decoder attention                                  # the reference experiment: COCO
    python train.py --decoder rnn --config configs/shapes.yaml --out runs/shapes-rnn
    python train.py --resume runs/shapes-rnn/last.pt --epochs 20         # continue, with more epochs

configs/default.yaml holds every key and its default; --config FILE overlays a YAML file and any
key can be given as --key value (train.py --help lists them). The run folder gets config.yaml,
log.jsonl, last.pt and best.pt; a resumed run continues in the folder that holds its checkpoint
(or in --out), and --overwrite replaces a run already in the folder.

The script reads in the order it runs: config -> data -> models -> optimisers -> for each epoch, for
each step: loss, backward, clip, step, log -> validate -> checkpoint -> early stop. The machinery
that keeps a run safe lives in checkpoint.py (save, restore, resume), distributed.py (torchrun,
signals), datasets.py (the feature cache) and hardware.py (mixed precision).
"""
import math
import os
import random
import sys
import time
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import distributed
from checkpoint import RunLog, RunState, check_init, check_word_map, finite_weights, prepare_run_folder
from config import RUN_KEYS, default_config, dump_yaml, resolve_config
from datasets import CaptionDataset, TrainItem, Vocabulary, feature_cache, load_word_map
from decoding import DecodeOptions, caption_features
from hardware import OtherLoad, amp_context, check_amp, peak_memory_mb
from metrics import CiderD, corpus_bleu
from encoder import build_encoder, features_of
from models import ModelConfig, build_decoder
from objectives import LossSums, Step, build_objective
from utils import InputError, run_cli


def main():
    # config
    cfg, ckpt, init, overwrite = resolve_config(sys.argv[1:], usage=__doc__)
    rank, local_rank, world, device = distributed.setup(cfg["device"])
    say = print if rank == 0 else (lambda *a, **k: None)
    check_amp(cfg, device)

    # data
    word_map = load_word_map(cfg["data_folder"], cfg["data_name"])
    where = "give --data_folder where its data is now"
    if ckpt:
        check_word_map(ckpt, word_map, cfg["data_folder"], cfg["data_name"], "the checkpoint", where)
    if init:  # a new run from another run's weights (scst from an xe checkpoint)
        check_init(init, cfg, cfg["init_from"])
        check_word_map(init, word_map, cfg["data_folder"], cfg["data_name"], cfg["init_from"], where)
    train_set = CaptionDataset(cfg["data_folder"], cfg["data_name"], "TRAIN")
    val_set = CaptionDataset(cfg["data_folder"], cfg["data_name"], "VAL")
    if rank == 0:
        prepare_run_folder(cfg["out"], ckpt is not None, overwrite)
        defaults = default_config()
        changed = {k: v for k, v in cfg.items() if v != defaults.get(k)}
        say(f"config (all of it in {os.path.join(cfg['out'], 'config.yaml')}), besides configs/default.yaml: "
            + ", ".join(f"{k}={v}" for k, v in changed.items()))
        dump_yaml(cfg, os.path.join(cfg["out"], "config.yaml"))

    # models and optimisers
    torch.manual_seed(cfg["seed"] + 1000003 * rank)  # rank 0 draws what a single process draws
    random.seed(cfg["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run = build_run(cfg, word_map, train_set.image_size, device, rank, world, bool(ckpt or init), train_set)
    if ckpt:
        run.restore(ckpt)
    elif init:
        run.encoder.load_state_dict(init["encoder"])
        run.decoder.load_state_dict(init["decoder"])
    scst = cfg["objective"] == "scst"
    amp = amp_context(cfg, device)
    if cfg["cache_features"] is True and cfg["fine_tune_encoder"]:
        raise InputError("cache_features: true needs a frozen encoder (fine_tune_encoder: false)")
    if cfg["cache_features"] is True or cfg["cache_features"] == "auto" and run.encoder.frozen:
        if dist.is_initialized() and local_rank:  # one process per machine writes the cache, the others wait
            dist.barrier()
        for split in (train_set, val_set):
            split.use_features(feature_cache(split, run.encoder, cfg, device, amp))
        if dist.is_initialized() and not local_rank:
            dist.barrier()

    pin = device.type == "cuda"
    per_image = 1 if scst else cfg["train_captions_per_image"]  # scst: every image once an epoch
    grouped = scst or cfg["group_by_image"]  # each image read (and encoded) once for its captions of the batch
    sampler = distributed.EpochSampler(train_set.num_images, train_set.cpi, cfg["seed"], per_image,
                                       cfg["batch_size"], rank, world, grouped, train_set.caplens,
                                       0 if scst else cfg["length_pool"])  # scst: its samples' lengths are its own
    if sampler.pool:  # a batch of short captions must not weigh its words more than a random batch does
        run.mean_tokens = float((train_set.caplens - 1).float().mean())
    if grouped and cfg["batch_size"] % sampler.k:
        raise InputError(f"group_by_image needs a batch_size that is a multiple of the {sampler.k} captions per image "
                         f"(train_captions_per_image, 0: all {train_set.cpi}); got batch_size {cfg['batch_size']}")
    if grouped and not scst and run.decoder.image_batchnorm and cfg["batch_size"] // sampler.k < 32:
        say(f"note: group_by_image: the plain decoder's BatchNorm (its initial state) normalises over "
            f"{cfg['batch_size'] // sampler.k} images per batch, not {cfg['batch_size']}; batch_size "
            f"{32 * sampler.k} keeps 32 (docs/training.md)")
    loader_rng = torch.Generator().manual_seed(cfg["seed"] + rank)  # worker seeds, kept off the global RNG
    train_loader = DataLoader(train_set, batch_size=cfg["batch_size"] // sampler.k if grouped else cfg["batch_size"],
                              sampler=sampler, num_workers=cfg["workers"],
                              pin_memory=pin, generator=loader_rng, persistent_workers=cfg["workers"] > 0,
                              worker_init_fn=distributed.ignore_stop_signals)
    val_images = min(cfg["val_max_images"] or len(val_set), len(val_set))
    val_loader = DataLoader(Subset(val_set, range(rank, val_images, world)), batch_size=cfg["batch_size"],
                            num_workers=cfg["workers"], pin_memory=pin, worker_init_fn=distributed.ignore_stop_signals)
    if len(sampler) == 0:
        raise InputError(f"an epoch has fewer TRAIN captions than one batch ({cfg['batch_size']} x {world} processes)")
    run.steps_per_epoch = math.ceil(len(train_loader) / cfg["accumulation_steps"])
    for line in resume_changes(run, ckpt["config"]) if ckpt else ():
        say(line)
    log = run.log = RunLog(os.path.join(cfg["out"], "log.jsonl"), run.log_lines if ckpt else 0, cfg["tensorboard"],
                           rank == 0)
    last, best = os.path.join(cfg["out"], "last.pt"), os.path.join(cfg["out"], "best.pt")

    first_epoch = run.epoch
    with distributed.StopRequest() as stop:
        try:
            while run.epoch < cfg["epochs"] and not (cfg["patience"] and run.bad_epochs >= cfg["patience"]):
                sampler.set_epoch(run.epoch, run.samples)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.time()
                with OtherLoad() as load:  # other processes (under torchrun: the other ranks too)
                    stats = train_epoch(run, train_loader, amp, stop)
                if stats is None:
                    say(f"stopped at max_steps {cfg['max_steps']}; continue with --resume {last} "
                        "--max_steps 0 (or a larger max_steps)")
                    break
                val = validate(run, val_loader, amp, stop)
                if val is None:  # asked to stop during validation: the epoch's training part is kept
                    run.save(last)
                    raise distributed.Stopped
                stats.update(val, others_cores=load.cores)
                improved = end_of_epoch(run, stats)
                log.write({"kind": "epoch", "epoch": run.epoch, "step": run.step, **stats,
                           "lr": run.decoder_optimizer.param_groups[0]["lr"], "epoch_time_s": time.time() - t0,
                           "peak_memory_mb": peak_memory_mb(device), "skipped_steps": run.skipped, "best": improved})
                run.save(last)
                if improved:
                    run.save(best)
                train_part = (f"train reward {stats.get('train_reward', 0):.3f}" if scst else
                              f"train loss {stats.get('train_loss', 0):.3f}")
                followed = ("val_cider" if scst else "val_loss" if cfg["early_stop_metric"] == "loss" else "val_bleu4")
                shown = {"val_loss": f"val loss {stats['val_loss']:.3f}",
                         "val_top5": f"top-5 {stats['val_top5']:.2%}",
                         "val_bleu4": f"BLEU-4 {stats['val_bleu4']:.4f}",
                         "val_cider": f"CIDEr-D {stats['val_cider']:.3f}"}
                if improved:  # beside the metric that picks best.pt, not after the last one shown
                    shown[followed] += " (best)"
                say(f"epoch {run.epoch}: {train_part}, {', '.join(shown.values())}, {time.time() - t0:.0f} s, "
                    f"{stats['images_per_s']:.0f} img/s{load.note}")
                if stop.agreed(device):
                    raise distributed.Stopped
            else:  # the epochs ran out, or patience did (not max_steps)
                patience_out = cfg["patience"] and run.bad_epochs >= cfg["patience"]
                if ckpt and run.epoch == first_epoch:
                    why = (f"it stopped early ({run.bad_epochs} epochs without improvement, patience "
                           f"{cfg['patience']})" if patience_out else f"it has trained all its {cfg['epochs']} epochs")
                    say(f"nothing left to train in {cfg['out']}: {why}; give a larger --epochs"
                        + (" or --patience" if patience_out else "") + " to train on")
                else:
                    if patience_out:
                        say(f"early stop: no improvement of {cfg['early_stop_metric']} for {run.bad_epochs} epochs "
                            f"(patience {cfg['patience']}); best checkpoint in {best}")
                    say(f"done: {run.epoch} epochs, run folder {cfg['out']}")
            if dist.is_initialized():
                distributed.check_ranks_agree((run.encoder, run.decoder), world)
                say(f"ranks agree: identical parameters on all {world} processes")
        except distributed.Stopped:
            say(f"{stop.name}: saved {last} at step {run.step}; continue with --resume {last}", file=sys.stderr)
            sys.exit(128 + (stop.signum or 2))
        except torch.OutOfMemoryError:
            bs, acc = cfg["batch_size"], cfg["accumulation_steps"]
            raise InputError(f"out of memory on {device} at batch_size {bs}: lower it and raise accumulation_steps "
                             f"to keep the effective batch, e.g. --batch_size {max(bs // 2, 1)} --accumulation_steps "
                             f"{acc * 2}") from None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def build_run(cfg, word_map, image_size, device, rank=0, world=1, resuming=False, train_set=None):
    """The encoder, the decoder, the training objective around them and their optimisers, as a fresh
    RunState. train_set: the TRAIN CaptionDataset, whose references self-critical training rewards."""
    model = ModelConfig.of(cfg)
    # A resumed run takes its encoder weights from the checkpoint, never from a download.
    encoder = build_encoder(model, "none" if resuming else cfg["encoder_weights"])
    # validation (and later decoding) attends as hard_inference says
    decoder = build_decoder(model, len(word_map), encoder.dim, cfg[model.decoder_class.dropout_key],
                            cfg["hard_inference"])
    encoder.fine_tune(cfg["fine_tune_encoder"])
    if dist.is_initialized() and device.type == "cuda":
        # The plain decoder's BatchNorm (initial state) then normalises over the global batch, as a
        # single process at batch_size x world would. SyncBatchNorm has no CPU kernel: on gloo each
        # rank normalises over its own batch_size images, and DDP copies rank 0's running
        # statistics to the others at every forward, so evaluation still sees one set.
        decoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(decoder)
    encoder.to(device)
    decoder.to(device)
    if device.type == "cuda":
        encoder.to(memory_format=torch.channels_last)
    vocab = Vocabulary(word_map)
    objective = build_objective(cfg, encoder, decoder, vocab, train_set, rank, world)
    if dist.is_initialized():  # DDP averages the gradients of whatever the objective trains
        objective = DistributedDataParallel(objective)
    lr = cfg["scst_lr"] if cfg["objective"] == "scst" else cfg["decoder_lr"]
    decoder_optimizer = torch.optim.Adam(decoder.parameters(), lr=lr, **decoder.adam)
    encoder_optimizer = None
    if cfg["fine_tune_encoder"]:
        encoder_optimizer = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=cfg["encoder_lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg["amp"]
                                  and cfg["amp_dtype"] == "float16")
    return RunState(cfg, word_map, image_size, encoder, decoder, objective, decoder_optimizer,
                    encoder_optimizer, scaler, device, rank, world)


def resume_changes(run, trained):
    """What a resumed run says of the training keys given anew (the model's are refused): which changed,
    from when they apply, and what that does to the learning rate, which the optimiser state brings back."""
    cfg, trained = run.cfg, {**default_config(), **trained}
    changed = [k for k in cfg if k not in RUN_KEYS and cfg[k] != trained.get(k)]
    if not changed:
        return []
    lines = [f"resumed at step {run.step} with changed keys, which apply from here on: "
             + ", ".join(f"{k} {trained[k]} -> {cfg[k]}" for k in changed)]
    group = run.decoder_optimizer.param_groups[0]
    base = group.get("base_lr", group["lr"])
    ignored = [k for k in ("decoder_lr", "scst_lr") if k in changed]
    if ignored:
        lines.append(f"  {ignored[0]} does not change a resumed run: the optimiser keeps the checkpoint's base rate "
                     f"{base:.3g} (start a new run with --init_from for another rate)")
    before, after = (base * lr_factor(run.step, *schedule(run, c)) for c in (trained, cfg))
    if not math.isclose(before, after):
        lines.append(f"  the learning-rate schedule changes with them: at step {run.step} the rate goes from "
                     f"{before:.3g} to {after:.3g} at once (the schedule is a function of the step)")
    return lines


def train_epoch(run, loader, amp, stop):
    """One epoch (or what is left of it after a resume): steps, log lines, and last.pt where asked.
    Returns the epoch's training statistics, or None at max_steps."""
    cfg, device, world = run.cfg, run.device, run.world
    run.encoder.train()
    run.decoder.train()
    if run.samples == 0:  # a run resumed mid-epoch keeps the sums of the part before
        run.sums, run.window = run.Sums(device=device), run.Sums(device=device)
    images_seen, t0 = 0, time.time()
    # A context manager, so that an error (out of memory, a stop) clears the bar before its message.
    with tqdm(total=len(loader), desc=f"train {run.epoch + 1}/{cfg['epochs']}", unit="batch", leave=False,
              disable=run.rank > 0) as bar:
        for group in batches_in_groups(loader, cfg["accumulation_steps"]):
            step_sums = train_step(run, group, amp)
            run.sums += step_sums
            run.window += step_sums
            images_seen += sum(b.length.numel() for b in group) * world  # (image, caption) pairs
            bar.update(len(group))
            if run.step % cfg["log_every"] == 0:
                means = run.Sums(distributed.all_sum(run.window.values)).per_token()  # {} if every step was skipped
                run.window = run.Sums(device=device)
                rate = images_seen / (time.time() - t0)
                run.log.write({"kind": "step", "epoch": run.epoch + 1, "step": run.step,
                           "lr": run.decoder_optimizer.param_groups[0]["lr"], "images_per_s": rate,
                           "skipped_steps": run.skipped, **means, **run.attention_grads.take(),
                           **{k: float(v) for k, v in run.objective_state().items()}})
                if means:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in list(means.items())[:3]}, img_s=f"{rate:.0f}")
            at_max = cfg["max_steps"] and run.step >= cfg["max_steps"]
            stopping = stop.agreed(device)
            if at_max or stopping or cfg["checkpoint_every"] and run.step % cfg["checkpoint_every"] == 0:
                run.save(os.path.join(cfg["out"], "last.pt"))
            if stopping:
                raise distributed.Stopped
            if at_max:
                return None
    sums, _ = run.global_sums()
    means = {k: 0.0 for k in run.Sums.FIELDS[:-1]} | sums.per_token()
    return {**{f"train_{k}": v for k, v in means.items()}, "images_per_s": images_seen / (time.time() - t0)}


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


def train_step(run, group, amp):
    """One optimiser step over a group of micro-batches (gradient accumulation). Returns this rank's
    sums of the objective's statistics on the device (LossSums, AttentionSums, RewardSums), zero for a
    skipped step."""
    cfg, device = run.cfg, run.device
    set_learning_rates(run)
    counts = (sum(int((b.length - 1).sum()) for b in group), sum(b.length.numel() for b in group))
    if dist.is_initialized():  # the whole step's counts, on all ranks
        counts = distributed.all_sum(torch.tensor(counts, dtype=torch.float32, device=device)) / run.world
    if run.mean_tokens:  # batches of one length (length_pool): each word weighs what it weighs in random
        counts = (counts[1] * run.mean_tokens, counts[1])  # batches, the tokens a step holds on average
    sums = run.Sums(device=device)
    for i, batch in enumerate(group):
        batch = TrainItem(*(t.to(device, non_blocking=True) for t in batch[:3]), batch.index)
        with ExitStack() as stack:
            if i < len(group) - 1 and isinstance(run.objective, DistributedDataParallel):
                stack.enter_context(run.objective.no_sync())  # all-reduce once per step, not per micro-batch
            with amp:
                # the micro-batch's seed: the same on every rank, and again after a resume
                loss, step_sums = run.objective(batch, Step(*counts, seed=cfg["seed"] * 1000003 + run.step * 1009 + i))
            sums += step_sums
            run.scaler.scale(loss).backward()
    for opt in run.optimizers:
        run.scaler.unscale_(opt)
    run.attention_grads.add()
    norm = torch.nn.utils.clip_grad_norm_(run.params, cfg["grad_clip"] or math.inf)
    if run.scaler.is_enabled():  # the fp16 scaler skips non-finite steps itself, and lowers its scale
        for opt in run.optimizers:
            run.scaler.step(opt)
        run.scaler.update()
        finite = True
    else:  # one host sync per optimiser step, none inside the word loop
        finite = bool(torch.isfinite(norm))
        if finite:
            for opt in run.optimizers:
                opt.step()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    run.step += 1
    run.samples += len(group) * cfg["batch_size"] * run.world
    if finite:
        run.nonfinite_run = 0
        return sums
    run.skipped += 1
    run.nonfinite_run += 1
    if run.nonfinite_run >= cfg["max_nonfinite_steps"]:
        raise InputError(f"the loss or its gradient was not finite for {run.nonfinite_run} steps in a row (up to "
                         f"step {run.step}); nothing was stepped on them. Lower decoder_lr (now {cfg['decoder_lr']}) "
                         "or look for broken data; last.pt and best.pt hold the last good weights")
    return run.Sums(device=device)


def lr_factor(step, warmup, total=0):
    """The schedule at optimiser step `step` (0-based). The warm-up: a linear rise over `warmup` steps,
    then a decay with the inverse square root of the step (Vaswani et al. 2017's shape), 1 at its peak; 1
    at every step when warmup is 0. A Transformer's attention is unstable under Adam's first, poorly
    estimated steps at the full rate; the decay then follows how Transformers are usually trained.
    Times, when `total` is not 0 (lr_schedule: cosine), a half cosine from 1 at step 0 to 0 at `total`."""
    factor = min((step + 1) / warmup, math.sqrt(warmup / (step + 1))) if warmup else 1.0
    if total:
        factor *= 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return factor


def schedule(run, cfg):
    """lr_factor's warmup and total for a run under the config cfg."""
    return run.decoder.warmup_steps(cfg), cfg["epochs"] * run.steps_per_epoch if cfg["lr_schedule"] == "cosine" else 0


def set_learning_rates(run):
    """Each parameter group's rate for this step: its base rate (decoder_lr, encoder_lr or scst_lr, as
    lowered on plateaus by lr_decay_factor) x the schedule (the decoder's warm-up, lr_schedule). Both follow from what a
    checkpoint already holds (the base rate is a key of the optimiser's group, the schedule a function
    of the step counter), so a resumed run has the uninterrupted run's rates."""
    factor = lr_factor(run.step, *schedule(run, run.cfg))
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * factor  # checkpoints before base_lr: lr


@torch.no_grad()
def validate(run, loader, amp, stop):
    """Teacher-forced loss and top-5 over every reference caption, and BLEU-4 of real decoding; under
    torchrun each rank takes its shard of the split and the results are gathered, so every rank gets
    the same numbers (and takes the same early-stopping decision). None when a single process is
    asked to stop; under torchrun, and after the last batch, the loop stops once the epoch is saved."""
    cfg, device = run.cfg, run.device
    run.encoder.eval()
    run.decoder.eval()
    vocab = run.vocab
    options = DecodeOptions(cfg["val_beam_size"], cfg["max_decode_len"], max_len_name="max_decode_len")
    sums = LossSums(device=device)
    references, hypotheses = [], []
    for batch in tqdm(loader, desc="validate", unit="batch", leave=False, disable=run.rank > 0):
        if not dist.is_initialized() and stop.signum is not None:  # under torchrun the stop waits for the end
            return None
        all_captions = batch.captions.to(device)  # B x cpi x (max_len + 2)
        with amp:
            feats = features_of(run.encoder, batch.image.to(device))  # B x P x D
            captions = all_captions.flatten(0, 1)  # B*cpi x (max_len + 2)
            lengths = (captions != vocab.pad).sum(1)
            sums += LossSums.of(run.objective_module.teacher_forced(feats, captions, lengths)[0])  # cpi per image
            hypotheses += [c.words for c in caption_features(run.decoder, vocab, feats, options)]
        references += [[vocab.decode(c) for c in caps] for caps in all_captions.tolist()]
    if dist.is_initialized():
        shards = [None] * run.world
        dist.all_gather_object(shards, (references, hypotheses))
        references = [r for refs, _ in shards for r in refs]
        hypotheses = [h for _, hyps in shards for h in hyps]
    means = LossSums(distributed.all_sum(sums.values)).per_token()
    cider = CiderD(references).score(hypotheses, references)  # CIDEr-D, document frequencies from VAL
    return {"val_loss": means["ce"], "val_top5": means["top5"], "val_bleu4": corpus_bleu(references, hypotheses),
            "val_cider": sum(cider) / len(cider)}


def end_of_epoch(run, stats):
    """Early-stopping bookkeeping and learning-rate decay; True when this epoch is the best so far."""
    cfg = run.cfg
    # BLEU-4 first, validation loss to break ties: early on BLEU-4 is often 0 for several epochs
    # while the loss is still falling, and that is progress. NaN never compares as an improvement.
    score = [stats["val_bleu4"], -stats["val_loss"]]
    if cfg["objective"] == "scst":  # the metric it optimises
        score = [stats["val_cider"], -stats["val_loss"]]
    elif cfg["early_stop_metric"] == "loss":
        score = score[::-1]
    improved = score > run.best and finite_weights((run.encoder, run.decoder))
    run.best, run.bad_epochs = (score, 0) if improved else (run.best, run.bad_epochs + 1)
    if not improved and cfg["lr_decay_patience"] and run.bad_epochs % cfg["lr_decay_patience"] == 0:
        for opt in run.optimizers:
            for group in opt.param_groups:
                group["base_lr"] = group.setdefault("base_lr", group["lr"]) * cfg["lr_decay_factor"]
                group["lr"] *= cfg["lr_decay_factor"]
    run.epoch, run.samples = run.epoch + 1, 0
    return improved


if __name__ == "__main__":
    run_cli(main)
