"""A training run's state, what its checkpoint holds, the run folder (last.pt, best.pt, log.jsonl), and
every way a checkpoint is read: load_checkpoint (the file, safely), load_trained (a model for
inference: eval.py, caption.py, the Python API), check_resumable and check_init (train.py), and
check_word_map (against prepared data).

CHECKPOINT_KEYS is the one list of what a checkpoint holds: RunState.save writes exactly these keys,
RunState.restore reads them back, and check_resumable refuses a file that lacks any of them.
load_trained reads only config, model, word_map, image_size, encoder and decoder.
"""
import glob
import hashlib
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

import distributed
from datasets import Vocabulary, data_path
from encoder import build_encoder
from models import ModelConfig, build_decoder
from objectives import LossSums
from utils import InputError, as_typed, atomic_path, checkpoint_file

# The counters of a run, saved and restored as they are.
COUNTERS = ("epoch", "samples", "step", "best", "bad_epochs", "skipped")
CHECKPOINT_KEYS = ("config", "model", "word_map", "image_size", "encoder", "decoder", "objective", "decoder_optimizer",
                   "encoder_optimizer", "scaler", *COUNTERS, "log_lines", "sums", "window", "attention_grads", "rng")


TUTORIAL_CLASSES = ("models.Encoder", "models.DecoderWithAttention")  # what its checkpoints pickle


def load_checkpoint(path):
    """A checkpoint, loaded safely: weights_only=True unpickles tensors and plain containers only, so
    a crafted file cannot run code here."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder: pass one of its checkpoints (best.pt for the best validation "
                         "score, last.pt to continue training)")
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, or a pickle that wants to run code
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message carries terminal colour codes
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if found and (found.group(1).startswith("torch.nn.") or found.group(1) in TUTORIAL_CLASSES):
            raise InputError(f"{path} holds pickled model objects ({found.group(1)}), the way sgrvinod's tutorial "
                             "saves checkpoints, not the weights this repository's checkpoints hold: it cannot be "
                             "loaded safely or converted; train here with train.py (data the tutorial prepared "
                             "loads as it is)") from None
        if found:  # a pickle that asks for code: not a file of this repository's
            raise InputError(f"{path} is not a checkpoint of this repository (it asks to run {found.group(1)}, "
                             "which is not loaded, for safety)") from None
        # torch's own sentence (the first, never cut inside) for one that is truncated or not a checkpoint
        said = re.split(r"(?<=\.)\s", message.strip().splitlines()[0])[0].rstrip(".") if message.strip() else ""
        other = "best.pt" if os.path.basename(path) == "last.pt" else "last.pt"
        raise InputError(f"{path} is damaged or incomplete ({type(e).__name__}{': ' + said if said else ''}): "
                         f"copy it again, or use the {other} of the same run folder") from None

class Trained(NamedTuple):
    """A checkpoint's model, ready to decode: what eval.py, caption.py and Captioner use."""
    ckpt: dict
    encoder: torch.nn.Module
    decoder: torch.nn.Module
    vocab: Vocabulary


def load_trained(path, device, hard_inference=None, hard_inference_name="hard_inference="):
    """A checkpoint (or a run folder's best.pt) with its encoder and decoder in eval mode on `device`,
    checked against its own word map. Decoding attends as the run's hard_inference says (hard attention:
    expected or argmax), or as `hard_inference` overrides: refused, naming `hard_inference_name` (how the
    user gave it), for a decoder that has no cell to choose."""
    path = checkpoint_file(path)
    ckpt = load_checkpoint(path)
    word_map = ckpt["word_map"]
    rows = ckpt["decoder"]["embedding.weight"].shape[0]
    if rows != len(word_map):
        raise InputError(f"{path}: its decoder knows {rows} words but its word map has {len(word_map)}: it mixes "
                         "two vocabularies")
    model = ModelConfig.of_checkpoint(ckpt)
    if hard_inference and not model.decoder_class.hard_attention:
        raise InputError(f"{as_typed(hard_inference_name, hard_inference)} chooses how hard attention picks its "
                         f"cell; {path} was trained with --decoder {model.decoder}, which has no cell to pick: "
                         "leave it out")
    encoder = build_encoder(model)
    decoder = build_decoder(model, len(word_map), encoder.dim,
                            hard_inference=hard_inference or ckpt["config"].get("hard_inference", "expected"))
    try:
        encoder.load_state_dict(ckpt["encoder"])
        decoder.load_state_dict(ckpt["decoder"])
    except RuntimeError as e:
        raise InputError(f"{path}: its weights do not fit its config ({str(e).splitlines()[1].strip()})") from None
    return Trained(ckpt, encoder.to(device).eval(), decoder.to(device).eval(), Vocabulary(word_map))


@dataclass
class RunState:
    """The state of a training run: the models, the training objective around them (DDP-wrapped under
    torchrun: the training step calls it), the optimisers and gradient scaler, the log and the counters."""
    cfg: dict
    word_map: dict
    image_size: int
    encoder: torch.nn.Module
    decoder: torch.nn.Module
    objective: torch.nn.Module  # objectives.Objective, or the DDP wrapper around it
    decoder_optimizer: torch.optim.Optimizer
    encoder_optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int = 0
    world: int = 1
    log: "RunLog" = None  # log.jsonl (train.py opens it once the state is restored)
    epoch: int = 0
    samples: int = 0  # captions all ranks took in this epoch so far
    step: int = 0  # optimiser steps
    best: list = field(default_factory=lambda: [-math.inf, -math.inf])  # the early-stopping score
    bad_epochs: int = 0
    log_lines: int = 0  # lines of log.jsonl the restored checkpoint had seen (save writes the log's count)
    skipped: int = 0  # steps skipped for a non-finite gradient
    nonfinite_run: int = 0  # ... of them in a row (not saved: a resumed run starts a new count)
    sums: LossSums = None  # this rank's training sums of the epoch so far (objective.Sums), on the device
    window: LossSums = None  # ... since the last log line
    attention_grads: "AttentionGrads" = None  # the attention's gradients since the last log line
    # with length_pool: a TRAIN caption's mean tokens, for the loss's normaliser (train.train_step)
    mean_tokens: float | None = None
    steps_per_epoch: int = 0  # optimiser steps an epoch (lr_schedule: cosine spans epochs x these)

    def __post_init__(self):
        self.Sums = self.objective_module.Sums  # LossSums, AttentionSums or RewardSums
        self.sums, self.window = self.Sums(device=self.device), self.Sums(device=self.device)
        self.attention_grads = AttentionGrads(self.decoder.attention_parameters(), self.device)
        self.vocab = Vocabulary(self.word_map)
        self.params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]  # for clipping

    @property
    def objective_module(self):
        """The objective itself, within its DDP wrapper under torchrun."""
        return getattr(self.objective, "module", self.objective)

    def objective_state(self):
        """The objective's own state (hard attention's baseline), without the models it holds."""
        state = self.objective_module.state_dict()
        return {k: v for k, v in state.items() if not k.startswith(("encoder.", "decoder."))}

    @property
    def optimizers(self):
        return [o for o in (self.decoder_optimizer, self.encoder_optimizer) if o is not None]

    def global_sums(self):
        """(sums, window) summed over the ranks, on the CPU: every rank must call it."""
        return tuple(self.Sums(distributed.all_sum(s.values).cpu()) for s in (self.sums, self.window))

    def save(self, path):
        """Write a checkpoint. Every rank calls it (the sums are summed over the ranks); rank 0 writes."""
        sums, window = self.global_sums()
        if self.rank:
            return
        ckpt = {
            "config": self.cfg, "model": asdict(ModelConfig.of(self.cfg)), "word_map": self.word_map,
            "image_size": self.image_size,
            "encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
            "objective": self.objective_state(),
            "decoder_optimizer": self.decoder_optimizer.state_dict(),
            "encoder_optimizer": self.encoder_optimizer.state_dict() if self.encoder_optimizer else None,
            "scaler": self.scaler.state_dict(),
            **{k: getattr(self, k) for k in COUNTERS}, "log_lines": self.log.lines,
            "sums": sums.values, "window": window.values, "attention_grads": self.attention_grads.state(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }
        assert tuple(ckpt) == CHECKPOINT_KEYS
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)

    def restore(self, ckpt):
        """The mirror of save: weights, optimisers, scaler, counters, and last the random state, so
        the resumed run draws what the uninterrupted one would have drawn."""
        self.encoder.load_state_dict(ckpt["encoder"])
        self.decoder.load_state_dict(ckpt["decoder"])
        self.objective_module.load_state_dict({**self.objective_module.state_dict(), **ckpt["objective"]})
        self.decoder_optimizer.load_state_dict(ckpt["decoder_optimizer"])
        # Fine-tuning switched on at resume starts a fresh encoder optimiser.
        if self.encoder_optimizer and ckpt["encoder_optimizer"]:
            self.encoder_optimizer.load_state_dict(ckpt["encoder_optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        for k in (*COUNTERS, "log_lines"):
            setattr(self, k, ckpt[k])
        if self.rank == 0:  # the saved sums are global: the other ranks add theirs from zero
            self.sums, self.window = (self.Sums(ckpt[k]).to(self.device) for k in ("sums", "window"))
        self.attention_grads.restore(ckpt["attention_grads"])  # the same on every rank (DDP averaged them)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        random.setstate(ckpt["rng"]["python"])
        if self.rank:  # different dropout masks on every rank
            torch.manual_seed(self.cfg["seed"] + 1000003 * self.rank + self.step)


class AttentionGrads:
    """How noisy the attention's gradient is: over the steps since the last log line, the variance of
    each attention parameter's gradient, averaged over the parameters, and the signal-to-noise ratio
    (mean squared mean gradient / that variance). Hard attention's estimators differ most in this."""

    def __init__(self, params, device):
        self.params = params
        size = sum(p.numel() for p in self.params)
        self.sum = torch.zeros(size, dtype=torch.float64, device=device)
        self.squares = torch.zeros_like(self.sum)
        self.steps = 0

    def add(self):
        """After backward (and unscaling): this step's gradients."""
        if not self.params:
            return
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params]).double()
        self.sum += g
        self.squares += g * g
        self.steps += 1

    def take(self):
        """{attention_grad_var, attention_grad_snr} since the last call ({} with fewer than 2 steps), then reset."""
        out = {}
        if self.steps >= 2:
            mean = self.sum / self.steps
            var = (self.squares / self.steps - mean * mean) * self.steps / (self.steps - 1)
            out = {"attention_grad_var": float(var.mean()),
                   "attention_grad_snr": float((mean * mean).mean() / var.mean())}
        self.sum.zero_(), self.squares.zero_()
        self.steps = 0
        return out

    def state(self):
        return {"sum": self.sum.cpu(), "squares": self.squares.cpu(), "steps": self.steps}

    def restore(self, state):
        if self.params:
            self.sum.copy_(state["sum"]), self.squares.copy_(state["squares"])
            self.steps = state["steps"]


def weights_id(ckpt):
    """A short fingerprint of a checkpoint's weights: eval.py's results say which model they score."""
    digest = hashlib.sha1()
    for part in ("encoder", "decoder"):
        for name, value in sorted(ckpt[part].items()):
            digest.update(name.encode() + value.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_resumable(ckpt, cfg, path):
    """A checkpoint can be resumed with `cfg` when train.py wrote all of it and the model is the same."""
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise InputError(f"{path} cannot be resumed: it lacks {missing[0]!r} (written by an older train.py, or "
                         "not by train.py); eval.py and caption.py can still use it")
    for key, asked, trained in ModelConfig.of(cfg).differences(ModelConfig.of_checkpoint(ckpt)):
        raise InputError(f"{path} was trained with {key} {trained!r}, the config asks for {asked!r}: a resumed run "
                         "keeps its model; start a new run with --out instead")


def check_init(init, cfg, path):
    """A new run starting from `init`'s weights (scst from an xe checkpoint): same model, same data."""
    found = ModelConfig.of(cfg).differences(ModelConfig.of_checkpoint(init))
    if cfg["data_name"] != init["config"]["data_name"]:
        found.append(("data_name", cfg["data_name"], init["config"]["data_name"]))
    for key, asked, trained in found:
        raise InputError(f"{path} was trained with {key} {trained!r}, this run asks for {asked!r}: "
                         "--init_from needs the same model and data")


def check_word_map(ckpt, word_map, folder, name, path, what_to_do):
    """The one check that prepared data (folder, name) has the vocabulary the checkpoint at `path` knows."""
    if ckpt["word_map"] != word_map:
        raise InputError(f"the word map of {path} ({len(ckpt['word_map'])} words) differs from "
                         f"{data_path(folder, 'WORDMAP', name)} ({len(word_map)} words): {what_to_do}")


def prepare_run_folder(out, resuming, overwrite):
    """Create the run folder; refuse to start a new run over another one's checkpoints."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"run folder {out} is a file")
    if not resuming and not overwrite:
        for name in ("last.pt", "best.pt"):
            if os.path.exists(os.path.join(out, name)):
                raise InputError(f"{out} already holds a run ({name}): pass --resume {out}/last.pt to "
                                 "continue it, --overwrite to replace it, or --out for a new folder")
    os.makedirs(out, exist_ok=True)
    for stale in glob.glob(os.path.join(out, "*.tmp[0-9]*")):  # left by a killed process
        os.remove(stale)


def finite_weights(modules):
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


class RunLog:
    """log.jsonl, one JSON object per line, written by rank 0 only. On resume it is cut back to what
    the checkpoint had seen, so a run resumed after a crash has no duplicated lines."""

    def __init__(self, path, keep_lines, tensorboard=False, enabled=True):
        self.path, self.enabled, self.lines = path, enabled, 0
        self.writer = tensorboard_writer(os.path.dirname(path)) if tensorboard and enabled else None
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
            for k, v in record.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])


def tensorboard_writer(folder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard: true, but the tensorboard package is not installed; logging to log.jsonl only")
        return None
    return SummaryWriter(folder)
