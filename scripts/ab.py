"""A speed-up as a ratio from one run: the same command on an earlier commit's code and on the working
tree's, interleaved (before, after, after, before, ...), on the same data and machine.

    python scripts/ab.py --before HEAD --runs 3 --log -- \\
        python {code}/train.py --decoder attention --config {code}/configs/shapes.yaml --epochs 2 --out {out}
    python scripts/ab.py --before HEAD --grep "^ +3 +([0-9.]+)" -- python {code}/eval.py \\
        --checkpoint runs/demo-attention/best.pt --beam-size 3 --benchmark-decoding 500

Both run in the repository's root, so data/ and runs/ are the same for both; `{code}` is the folder of
the code (the earlier commit's, extracted with git archive into a temporary folder, or this working
tree), so `python {code}/train.py` imports that code's modules; `{out}` is a fresh folder per run;
--after-args is added to the after runs only (an option the earlier code lacks). The
measure: with --log, the median of the epochs' images/s in {out}/log.jsonl (train.py's own figure);
with --grep, the number its first group matches in the output; else seconds of wall clock. Prints
each run and the ratio after / before of the medians (of rates: higher is faster; of seconds: before /
after), with the CPU it ran on; --json writes them.
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name():
    """The CPU as /proc/cpuinfo names it, with its family and model (which tell AMD's Zen 3 from Zen 4)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        name, family, model = (info.get(k, "?") for k in ("model name", "cpu family", "model"))
        return f"{name} (family {family}, model {model}), {os.cpu_count()} cores"
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def extract(rev, folder):
    """The tracked files of commit `rev` into `folder`."""
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True)
    if archive.returncode:
        sys.exit(f"error: git archive {rev} failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)


def measure(args, out, output, seconds):
    if args.log:
        path = os.path.join(out, "log.jsonl")
        with open(path) as f:
            rates = [line["images_per_s"] for line in map(json.loads, f) if line.get("kind") == "epoch"]
        if not rates:
            sys.exit(f"error: {path} has no epoch lines: did the command train at least one epoch into {{out}}?")
        return statistics.median(rates)
    if args.grep:
        m = re.search(args.grep, output, re.M)
        if not m:
            sys.exit(f"error: --grep {args.grep!r} matched nothing in the command's output:\n{output[-2000:]}")
        return float(m.group(1))
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="HEAD", help="the earlier commit (default: HEAD, the working tree's base)")
    p.add_argument("--runs", type=int, default=3, help="runs of each, interleaved")
    p.add_argument("--log", action="store_true", help="measure the median epoch images/s of {out}/log.jsonl")
    p.add_argument("--grep", help="measure the number this regular expression's first group matches in the output")
    p.add_argument("--after-args", default="", help="arguments the after runs add (a new option the earlier code "
                   "lacks: --after-args '--length_pool 100')")
    p.add_argument("--json", help="write the runs and the ratio here")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, with {code} (and {out})")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not any("{code}" in c for c in command):
        p.error("give the command after --, with {code} where the code's folder goes (python {code}/train.py ...)")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    work = tempfile.mkdtemp(prefix="ab-")
    try:
        code = {"before": os.path.join(work, "before"), "after": ROOT}
        os.makedirs(code["before"])
        extract(args.before, code["before"])
        results = {"before": [], "after": []}
        for r in range(args.runs):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                out = os.path.join(work, f"{side}-{r}")
                argv = [c.replace("{code}", code[side]).replace("{out}", out) for c in command]
                argv += args.after_args.split() if side == "after" else []
                t0 = time.perf_counter()
                done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                if done.returncode:
                    sys.exit(f"error: the {side} run failed (status {done.returncode}): {' '.join(argv)}\n"
                             f"{(done.stdout + done.stderr)[-3000:]}")
                value = measure(args, out, done.stdout + done.stderr, seconds)
                results[side].append(value)
                print(f"run {r + 1} {side:6s}: {value:.4g}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before, after = (statistics.median(results[s]) for s in ("before", "after"))
    rate = args.log or args.grep  # higher is faster; else seconds
    ratio = after / before if rate else before / after
    unit = "images/s (median of the epochs)" if args.log else "(as matched)" if args.grep else "s"
    summary = {"cpu": cpu_name(), "before": args.before, "command": " ".join(command), "after_args": args.after_args,
               "unit": unit, **results,
               "median_before": before, "median_after": after, "speedup": ratio}
    print(f"{summary['cpu']}\nbefore ({args.before}) {before:.4g}, after (the working tree) {after:.4g} {unit}: "
          f"{ratio:.2f}x faster, the medians of {args.runs} interleaved runs each")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
