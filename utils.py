"""Small helpers shared by the scripts: user-facing errors, atomic file writes, option names."""
import argparse
import errno
import json
import os
import re
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


def grid_side(cells):
    """The side G of a square attention grid of `cells` = G * G cells."""
    return int(round(cells ** 0.5))


def option_key(name):
    """--beam-size and --beam_size name the same option: every script accepts both spellings."""
    return name.replace("-", "_")


class ArgumentParser(argparse.ArgumentParser):
    """argparse where --dash-names are also accepted as --underscore_names and the reverse (see
    option_key), and a mistake is one line. train.py, whose many keys would list twice in --help, takes
    spellings=False and reads its command line through `one_spelling` instead."""

    def __init__(self, *args, spellings=True, **kw):
        self.spellings = spellings  # before argparse adds -h
        super().__init__(*args, **kw)

    def add_argument(self, *names, **kw):
        if not self.spellings:
            return super().add_argument(*names, **kw)
        spellings = [n for name in names if name.startswith("--")
                     for n in ("--" + option_key(name[2:]), "--" + option_key(name[2:]).replace("_", "-"))]
        return super().add_argument(*dict.fromkeys([*names, *spellings]), **kw)

    def error(self, message):
        message = re.sub(r"(--[\w-]+)(/--[\w-]+)+", r"\1", message)  # one spelling of an option, not all
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def as_typed(name, value):
    """An option with its value as the user wrote it: "--max-len 100" on a command line, "max_len=100" in
    Python (a `name` ending in "=")."""
    return f"{name}{value}" if name.endswith("=") else f"{name} {value}"


def one_spelling(argv):
    """A command line with every --dash-name written --underscore_name (a value after = left as it is)."""
    def spelt(arg):
        name, eq, value = arg[2:].partition("=")
        return f"--{option_key(name)}{eq}{value}"
    return [spelt(a) if a.startswith("--") else a for a in argv]


def at_least(low, kind=int):
    """An argparse type: a `kind` number >= low, or the error "argument --NAME: must be at least ..."."""
    def number(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return number


def checkpoint_file(path):
    """--checkpoint as given, or a run folder's best.pt (said), for eval.py and caption.py."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "best.pt")):
        print(f"{path} is a run folder: using its best.pt")
        return os.path.join(path, "best.pt")
    return path
