"""Training under torchrun: joining the process group, summing across ranks, the sampler that shards an
epoch, stopping every rank at the same step, and the final check that the ranks agree.

A plain `python train.py` is world size 1: every helper here then does what a single process needs.
"""
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from utils import pick_device


def setup(device_name):
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


def check_ranks_agree(modules, world):
    """DDP keeps the replicas equal; a rank that drifted (different data, a non-deterministic op that
    changed a branch) would make the saved rank-0 weights a lie, so say so rather than finish quietly."""
    flat = torch.cat([p.detach().double().flatten() for m in modules for p in m.parameters()])
    spread = torch.stack([flat, -flat])
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    if not torch.equal(spread[0], -spread[1]):
        raise RuntimeError(f"the {world} ranks ended with different parameters "
                           f"(largest difference {(spread[0] + spread[1]).abs().max().item():.3g})")


class EpochSampler(Sampler):
    """A permutation drawn from (seed, epoch), read from position `start` (in captions): a run resumed
    in the middle of an epoch sees exactly the samples the uninterrupted run would have seen. With
    `per_image` k > 0 an epoch visits each image with k of its captions, drawn afresh each epoch,
    instead of all. `grouped` keeps an image's k captions together: each item is then the tuple of
    their indices (CaptionDataset reads the image once for them), and a batch of batch_size captions
    is batch_size / k images.

    With `lengths` (each caption's, in tokens) and `length_pool` p > 0, batches hold captions of
    similar length: each run of p global batches of the permutation is sorted by length (an image by
    its longest caption when grouped), cut into batches, and the epoch's batches shuffled. The decoders
    run every word step up to a batch's longest caption, so random batches spend about half their
    recurrent work on padding (docs/benchmarks.md). p = 0 leaves the permutation as it is.

    Under torchrun every rank draws the same permutation and takes every world-th item of it, so the
    ranks' batches together are the batch a single process would take at batch_size x world; the
    incomplete last global batch is dropped, so every rank runs the same number of steps. (It does
    what DistributedSampler does, plus the mid-epoch start and the per-image caption draw.)"""

    def __init__(self, num_images, cpi, seed, per_image=0, batch_size=1, rank=0, world=1, grouped=False,
                 lengths=None, length_pool=0):
        self.num_images, self.cpi, self.seed = num_images, cpi, seed
        self.lengths, self.pool = lengths, length_pool if lengths is not None else 0
        self.k = per_image if 0 < per_image < cpi else cpi
        self.batch, self.rank, self.world, self.grouped = batch_size, rank, world, grouped
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
        if self.grouped:  # images in random order, each with its k captions
            groups = items.view(self.num_images, self.k)[torch.randperm(self.num_images, generator=g)]
            groups = self.by_length(groups, g)
            groups = groups[self.start // self.k:][: len(self) * self.world][self.rank :: self.world]
            return iter([tuple(group) for group in groups.tolist()])
        items = self.by_length(items[torch.randperm(len(items), generator=g)][:, None], g)[:, 0][self.start:]
        return iter(items[: len(self) * self.world][self.rank :: self.world].tolist())

    def by_length(self, rows, g):
        """rows: n x k caption indices in random order (an image's k captions, or k = 1) -> the epoch's
        whole global batches, in pools of length_pool batches sorted by length, the batches shuffled."""
        if not self.pool:
            return rows
        whole = self.batch * self.world // (rows.size(1) if self.grouped else 1)  # rows per global batch
        rows = rows[: len(rows) // whole * whole]  # the incomplete last batch is dropped, as ever
        pools = rows.split(self.pool * whole)
        rows = torch.cat([p[self.lengths[p].amax(1).argsort(stable=True)] for p in pools])
        batches = rows.view(-1, whole, rows.size(1))
        return batches[torch.randperm(len(batches), generator=g)].flatten(0, 1)

    def __len__(self):
        """Items this rank takes in the (rest of the) epoch: captions, or images when grouped."""
        whole = self.batch * self.world
        captions = (self.num_images * self.k - self.start) // whole * self.batch
        return captions // self.k if self.grouped else captions


class Stopped(Exception):
    """Raised after last.pt is saved because of a stop request."""


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to save last.pt and exit at the next step boundary; a second
    Ctrl-C exits at once (atomic writes keep the checkpoints on disk whole either way). A context
    manager: the previous handlers come back on exit."""

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving last.pt at the end of this step "
              "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else "stop"

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
