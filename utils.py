"""Small helpers shared by the scripts: user-facing errors and atomic file writes."""
import errno
import json
import os
import shutil
import sys
from contextlib import contextmanager


class InputError(Exception):
    """Something the user gave us is wrong. Scripts report it as one line and exit with status 2."""


def run_cli(main):
    """Run a script's main(); an InputError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path` and rename it to `path` only if the block succeeds,
    so an error, Ctrl-C or a crash never leaves a half-written file under the real name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
    except BaseException as e:
        full = disk_full(e, os.path.dirname(os.path.abspath(path)))
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise InputError(f"no space left on the device while writing {path}: free some space and run again "
                             "(what was there before is untouched)") from None
        raise
    os.replace(tmp, path)


def disk_full(error, folder):
    """ENOSPC, also as HDF5 reports it (in the message) and torch.save (only "unexpected pos": then
    the free space of the folder, measured before the partial file is removed, decides)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if not isinstance(error, OSError | RuntimeError):
        return False
    if "No space left on device" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < 2**24
    except OSError:
        return False


def load_checkpoint(path):
    """A checkpoint, loaded safely: weights_only=True unpickles tensors and plain containers only, so
    a crafted file cannot run code here."""
    import torch
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, or a pickle that wants to run code
        raise InputError(f"{path} is not a loadable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None


def pick_device(name):
    """auto | cpu | cuda -> torch.device; asking for cuda without a GPU is an InputError."""
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda asked for, but no CUDA GPU is visible; use cpu (or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_json(path, obj):
    """Write `obj` as JSON to a temporary file; the caller renames it (see atomic_path)."""
    with open(path, "w") as f:
        f.write(json.dumps(obj))  # dumps uses the C encoder; dump streams through the slow Python one


# ----------------------------------------------------------------------------- config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CHOICES = {
    "decoder": ("rnn", "attention"),
    "device": ("auto", "cpu", "cuda"),
    "amp_dtype": ("float16", "bfloat16"),
    "early_stop_metric": ("bleu4", "loss"),
    "cache_features": ("auto", True, False),
}
AT_LEAST = {"batch_size": 1, "accumulation_steps": 1, "epochs": 0, "max_steps": 0, "workers": 0,
            "train_captions_per_image": 0, "val_beam_size": 1,
            "max_decode_len": 1, "encoded_size": 1, "emb_dim": 1, "decoder_dim": 1, "attention_dim": 1,
            "patience": 0, "lr_decay_patience": 0, "max_nonfinite_steps": 1, "checkpoint_every": 0, "log_every": 1,
            "val_max_images": 0,
            "decoder_lr": 0.0, "encoder_lr": 0.0, "grad_clip": 0.0, "alpha_c": 0.0, "dropout": 0.0}
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def read_yaml(path):
    import yaml
    if not os.path.isfile(path):
        raise InputError(f"config file {path} not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold key: value pairs")
    return data


def default_config():
    return read_yaml(os.path.join(CONFIG_DIR, "default.yaml"))


def _coerce(key, value, default, source):
    """`value` (from YAML, or a string from the command line) as the type of the default."""
    kind = type(default)
    if key == "cache_features" and isinstance(value, str) and value.lower() in TRUE + FALSE:
        value = value.lower() in TRUE  # cache_features: true on the command line
    try:
        if kind is bool and isinstance(value, str) and value.lower() in TRUE + FALSE:
            value = value.lower() in TRUE
        elif kind is int and isinstance(value, str):
            value = int(value)
        elif kind is float and isinstance(value, str | int) and not isinstance(value, bool):
            value = float(value)
        elif default is None and isinstance(value, str) and value.lower() in ("null", "none", ""):
            value = None
    except ValueError:
        pass
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if key in CHOICES:
        ok = True  # checked against the choices below
    elif default is None:
        ok = value is None or isinstance(value, str)
    if not ok:
        expected = "a string or null" if default is None else kind.__name__
        raise InputError(f"{source}: {key} must be {expected}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise InputError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in AT_LEAST and value < AT_LEAST[key] or key.endswith("_lr") and value <= 0:
        low = "> 0" if key.endswith("_lr") else f">= {AT_LEAST[key]}"
        raise InputError(f"{source}: {key} must be {low}, got {value!r}")
    return value


def merge_config(cfg, updates, source):
    """cfg with `updates` applied; unknown keys and wrong types are InputErrors naming `source`."""
    cfg = dict(cfg)
    defaults = default_config()
    for key, value in updates.items():
        key = key.replace("-", "_")
        if key not in defaults:
            raise InputError(f"{source}: unknown config key {key!r} (see configs/default.yaml)")
        cfg[key] = _coerce(key, value, defaults[key], source)
    return cfg


def parse_cli(argv, flags=()):
    """`--key value` / `--key=value` pairs, plus the value-less `flags`. Returns (flags set, pairs)."""
    pairs, seen = {}, set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise InputError(f"unexpected argument {arg!r}: options are --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key in flags:
            seen.add(key)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise InputError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        pairs[key] = value
        i += 1
    return seen, pairs


def dump_yaml(cfg, path):
    import yaml
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
