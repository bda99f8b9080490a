"""What the machine can do: mixed precision per device, the CPU's bf16 kernels, peak memory."""
import contextlib
import functools
import os
import resource
import statistics
import sys
import time
import warnings
from contextlib import nullcontext

import torch

from utils import InputError


def amp_context(cfg, device):
    """CUDA: autocast in amp_dtype. CPU: bf16 autocast only when asked (fp16 autocast on CPU is slow)."""
    if cfg["amp"] and (device.type == "cuda" or cfg["amp_dtype"] == "bfloat16"):
        return torch.autocast(device.type, dtype=getattr(torch, cfg["amp_dtype"]))
    return nullcontext()


def _runs(fn):
    try:
        fn()
        return True
    except RuntimeError:
        return False


def _bf16_lstm():
    lstm = torch.nn.LSTM(8, 8)
    x = torch.zeros(1, 2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = lstm(x)
    out.float().sum().backward()


@functools.cache
def cpu_has_bf16_lstm():
    """Whether oneDNN has a bf16 kernel for the fused nn.LSTM on this CPU. CPUs with AVX-512 BF16 (or
    AMX) do; AVX2-only ones (AMD Zen 3, most Intel before Sapphire Rapids) raise "could not create a
    primitive descriptor for the LSTM forward propagation primitive". Tried once, on a tiny LSTM, with
    oneDNN on (bench.py counts FLOPs with it off, and this answer is kept)."""
    with onednn(True):
        return _runs(_bf16_lstm)


@contextlib.contextmanager
def onednn(enabled):
    """oneDNN's CPU kernels on or off inside, quietly (torch warns of a TF32 option for Intel GPUs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=enabled):
            yield


@functools.cache
def note_once(message):
    print(f"note: {message}", file=sys.stderr, flush=True)


def fp32_lstm_under_bf16(x):
    """True where an nn.LSTM fed `x` must run in fp32 because autocast asks for bf16 on a CPU without
    the kernel (said once per process)."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or cpu_has_bf16_lstm():
        return False
    note_once(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 kernel for nn.LSTM: the plain "
              "decoder's LSTM runs in fp32, the rest of the model in bf16")
    return True


def check_amp(cfg, device):
    """Refuse, before training starts, a precision this machine cannot run."""
    if not (cfg["amp"] and device.type == "cpu" and cfg["amp_dtype"] == "bfloat16"):
        return

    def step():
        layer = torch.nn.Linear(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(torch.zeros(2, 8))
        out.float().sum().backward()
    if not _runs(step):
        raise InputError(f"amp_dtype bfloat16 does not run on this CPU ({torch.backends.cpu.get_cpu_capability()}): "
                         "train with --amp false")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Other processes' mean CPU use, in cores, above which a speed is marked as measured on a busy machine:
# on 2 cores one other busy process slowed training 20x.
BUSY_CORES = 0.5


def _cpu_seconds():
    """(busy CPU seconds of the whole machine, of this process and its finished children) or None
    where /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    t = os.times()
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """`with OtherLoad() as load:` around a timed part: load.seconds is its wall time, load.cores the
    mean number of cores other processes kept busy meanwhile (None where unknown), load.note "" or a
    phrase marking a figure taken on a busy machine."""

    def __enter__(self):
        self.cores, self._start, self._t0 = None, _cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        end, self.seconds = _cpu_seconds(), time.perf_counter() - self._t0
        if end is not None and self._start is not None and self.seconds > 0:
            self.cores = max(0.0, ((end[0] - self._start[0]) - (end[1] - self._start[1])) / self.seconds)

    @property
    def note(self):
        return busy_note(self.cores)


def busy_note(cores):
    """"" or " (busy: ...)" for a speed measured while other processes used `cores` cores."""
    return f" (busy: other processes used {cores:.1f} cores)" if cores is not None and cores > BUSY_CORES else ""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, runs, warmup):
    """Seconds per call: median, min and max over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median_high(times), min(times), max(times)
