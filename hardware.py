"""What the machine can do: mixed precision per device, the CPU's bf16 kernels, peak memory."""
import functools
import resource
import sys
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
    primitive descriptor for the LSTM forward propagation primitive". Tried once, on a tiny LSTM."""
    return _runs(_bf16_lstm)


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
