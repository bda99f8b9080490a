"""Run the code blocks of Markdown pages as a reader would, top to bottom: every ```bash block in
bash (`set -euo pipefail`), every ```python block in one Python namespace per page, in the folder
given (default: the current one), with its .venv activated as the pages ask (`source
.venv/bin/activate`). A block whose previous line is `<!-- not run: why -->` is skipped.

    python scripts/run_docs.py docs/tutorial.md                # after make demo: draws runs/tutorial/*.png
    python scripts/run_docs.py README.md docs/*.md --cwd /tmp/workspace --list   # what would run

tests/test_docs.py runs every page this way in a workspace made by `make demo` at test size; make
tutorial runs the tutorial in the repository and copies its figures into docs/tutorial/. Exits with the failing block's
status, after printing where it is.
"""
import argparse
import os
import re
import subprocess
import sys
import time
import traceback

BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```\n", re.M | re.S)
SKIP = re.compile(r"<!-- not run: (.+?) -->\s*$")


def blocks(path):
    """[(line, language, code, why it is not run or None)] of one page."""
    with open(path) as f:
        text = f.read()
    out = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2), skip.group(1) if skip else None))
    return out


def run_page(path, cwd, listing=False):
    """Run one page's blocks in `cwd`; returns 0, or the status of the block that failed."""
    namespace = {"__name__": "__main__"}
    for line, language, code, skipped in blocks(path):
        where = f"{path}:{line} ({language})"
        if skipped:
            print(f"-- {where}: not run: {skipped}", flush=True)
            continue
        print(f"-- {where}", flush=True)
        if listing:
            print(code, end="")
            continue
        t0 = time.time()
        if language == "bash":
            status = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=activated(cwd)).returncode
        else:
            status = run_python(code, namespace, cwd, where)
        if status:
            print(f"!! {where} failed (status {status})", file=sys.stderr, flush=True)
            return status
        print(f"-- {where}: done in {time.time() - t0:.1f} s", flush=True)
    return 0


def activated(cwd):
    """The environment of a shell in `cwd` after `source .venv/bin/activate` (as it is, without a .venv)."""
    env, venv = dict(os.environ), os.path.abspath(os.path.join(cwd, ".venv"))
    if os.path.isdir(os.path.join(venv, "bin")):
        env.update(VIRTUAL_ENV=venv, PATH=os.path.join(venv, "bin") + os.pathsep + env.get("PATH", ""))
        env.pop("PYTHONHOME", None)
    return env


def run_python(code, namespace, cwd, where):
    here = os.getcwd()
    os.chdir(cwd)
    sys.path.insert(0, os.getcwd())  # as `python` started in that folder would import its modules
    try:
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 (the page's own code, run as its reader would)
        return 0
    except SystemExit as e:
        return e.code or 0
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        sys.path.remove(os.getcwd())
        os.chdir(here)


def main():
    p = argparse.ArgumentParser(description="run the code blocks of Markdown pages")
    p.add_argument("pages", nargs="+")
    p.add_argument("--cwd", default=".", help="folder the blocks run in")
    p.add_argument("--list", action="store_true", help="print the blocks instead of running them")
    args = p.parse_args()
    for page in args.pages:
        if not os.path.isfile(page):
            sys.exit(f"error: {page} not found")
    for page in args.pages:
        status = run_page(os.path.abspath(page), args.cwd, args.list)
        if status:
            sys.exit(status)


if __name__ == "__main__":
    main()
