"""Small helpers shared by the scripts: user-facing errors and atomic file writes."""
import json
import os
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
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_json(path, obj):
    """Write `obj` as JSON to a temporary file; the caller renames it (see atomic_path)."""
    with open(path, "w") as f:
        f.write(json.dumps(obj))  # dumps uses the C encoder; dump streams through the slow Python one
