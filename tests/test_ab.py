"""scripts/ab.py: a speed-up as a ratio of the same command on an earlier commit's code and the working
tree's, interleaved."""
import json
import sys

import pytest

from tests.helpers import run_script

# A stand-in for train.py: it writes {out}/log.jsonl with an epoch whose rate says which code ran it
# (the earlier commit's is extracted under a temporary ab- folder).
FAKE_TRAIN = ("import json, os, sys; out, code = sys.argv[1:]; os.makedirs(out); "
              "rate = 2.0 if os.path.basename(os.path.dirname(code)).startswith('ab-') else 3.0; "
              "open(os.path.join(out, 'log.jsonl'), 'w').write(json.dumps({'kind': 'epoch', 'images_per_s': rate}))")


@pytest.mark.slow  # starts the command in processes of its own
def test_ab_runs_both_codes_interleaved_and_gives_the_ratio(tmp_path):
    out = tmp_path / "ab.json"
    r = run_script("scripts/ab.py", "--before", "HEAD", "--runs", 2, "--log", "--json", out, "--",
                   sys.executable, "-c", FAKE_TRAIN, "{out}", "{code}")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["before"] == [2.0, 2.0] and result["after"] == [3.0, 3.0] and result["speedup"] == 1.5
    runs = [line for line in r.stdout.splitlines() if line.startswith("run ")]
    assert [line.split(":")[0] for line in runs] == ["run 1 before", "run 1 after ", "run 2 after ", "run 2 before"]
    assert "1.50x faster" in r.stdout
    r = run_script("scripts/ab.py", "--grep", "rate ([0-9.]+)", "--runs", 1, "--after-args", "x", "--",
                   sys.executable, "-c", "import sys; print('rate', len(sys.argv))", "{code}")
    assert r.returncode == 0 and "before (HEAD) 2, after (the working tree) 3 (as matched): 1.50x faster" in r.stdout
    r = run_script("scripts/ab.py", "--", sys.executable, "train.py")
    assert r.returncode == 2 and "with {code} where the code's folder goes" in r.stderr
    r = run_script("scripts/ab.py", "--grep", "nothing ([0-9]+)", "--", sys.executable, "-c", "print(1)", "{code}")
    assert r.returncode == 1 and "matched nothing in the command's output" in r.stderr
