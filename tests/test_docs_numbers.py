"""The numbers the README and the docs pages quote from the committed reports are the reports' own: every
margin with its interval (and its p-values where quoted), every mean ± standard deviation, and in a
results table every cell of a row from one group, each from its column's measure, and the training
speed from the report's cost table. A report made again (make reports) with other numbers fails here
until the pages say the new ones."""
import glob
import json
import os
import re

import pytest

from report import QUALITY
from results import label
from tests.helpers import ROOT

NUM = r"[+-]?\d+(?:\.\d+)?"
# "+0.21 [-0.67, +1.10]", "+20.7 points [+9.7, +31.8] (p < 0.001, 0.008 after Holm", "-11.9 points [...], p 0.010"
INTERVAL = re.compile(rf"({NUM})(?: points| pts)?\s*\[({NUM}),\s*({NUM})\]"
                      rf"(?:,?\s*\(?p\s*(<\s*)?(0?\.\d+)(?:,\s*(0?\.\d+) after Holm)?)?")
SPREAD = re.compile(r"(\d+(?:\.\d+)?)(%?) ± (\d+(?:\.\d+)?)(%?)")
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def close(quoted, value, scale=1):
    """Whether `quoted` (as written, "+20.7") is value x scale rounded to the quoted decimals."""
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return value is not None and abs(float(quoted) - value * scale) <= 0.5 * 10 ** -decimals + 1e-9


def linked_reports(text):
    """{name: comparison.json} of every committed report a page links to."""
    names = sorted(set(re.findall(r"reports/([\w-]+)/(?:report\.md|comparison\.json)", text)))
    out = {}
    for name in names:
        with open(os.path.join(ROOT, "reports", name, "comparison.json")) as f:
            out[name] = json.load(f)
    return out


def group_values(reports):
    """(report, group, measure, mean, sd or None) for every group of every report, at every beam."""
    return [(name, g["name"], k, v.get("mean", v.get("value")), v.get("sd"))
            for name, data in reports.items() for g in data["groups"]
            for by_measure in g["metrics"].values() for k, v in by_measure.items()]


def is_margin(m, difference, low, high, less, p, p_holm):
    for scale in (1, 100):  # points of a percentage, or the measure's own unit
        if all(close(q, m[k], scale) for q, k in ((difference, "difference"), (low, "low"), (high, "high"))):
            if p is not None and not (m["p"] < float(p) if less else close(p, m["p"])):
                return False
            return p_holm is None or close(p_holm, m["p_holm"])
    return False


@pytest.mark.parametrize("page", PAGES)
def test_every_interval_and_spread_is_a_linked_reports(page):
    text = open(os.path.join(ROOT, page)).read()
    reports = linked_reports(text)
    margins = [m for data in reports.values() for m in data["margins"]]
    values = group_values(reports)
    for found in INTERVAL.finditer(text):
        assert any(is_margin(m, *found.groups()) for m in margins), (
            f"{page}: {found.group(0)!r} is no margin of the reports it links ({', '.join(reports) or 'none'})")
    for found in SPREAD.finditer(text):
        mean, percent, sd, sd_percent = found.groups()
        assert any(close(mean, v, 100 if percent else 1) and close(sd, s, 100 if sd_percent else 1)
                   for _, _, _, v, s in values if s is not None), (
            f"{page}: {found.group(0)!r} is no group's mean ± sd in the reports it links ({', '.join(reports)})")


def measure_of(header):
    """The quality measure a results table's column header names ("3 objects", "pointing (chance 8%)")."""
    header = header.split(" (")[0]
    found = [k for k in QUALITY if label(k) == header or label(k).endswith(", " + header)]
    return found[0] if found else None


def cost_rows(report):
    """{run name: train images/s} from a report's cost table."""
    text = open(os.path.join(ROOT, "reports", report, "report.md")).read()
    section = text.split("## Cost", 1)[1].split("\n## ", 1)[0]
    return {row.split(" | ")[0].lstrip("| ").split(" (")[0]: float(row.split(" | ")[2])
            for row in section.splitlines() if row.startswith("| ") and not row.startswith("| run ")}


@pytest.mark.parametrize("page", PAGES)
def test_each_results_table_row_is_one_group(page):
    """In a table of means ± sd, each row's cells are one group's, each of its column's measure, and a
    train images/s column is the mean over that group's runs of the report's cost table."""
    text = open(os.path.join(ROOT, page)).read()
    reports = linked_reports(text)
    values = group_values(reports)
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, re.M):
        lines = block.strip().splitlines()
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            spreads = {h: SPREAD.fullmatch(c) for h, c in zip(header, cells, strict=False) if SPREAD.fullmatch(c)}
            if not spreads:
                continue
            groups = None
            for h, found in spreads.items():
                mean, percent, sd, sd_percent = found.groups()
                measure = measure_of(h)
                assert measure, f"{page}: the column {h!r} names no quality measure"
                fits = {(r, g) for r, g, k, v, s in values if k == measure and s is not None
                        and close(mean, v, 100 if percent else 1) and close(sd, s, 100 if sd_percent else 1)}
                groups = fits if groups is None else groups & fits
            assert groups, f"{page}: no one group of {', '.join(reports)} has every value of the row {cells[0]!r}"
            if "train images/s" in header:
                (report, group), *_ = sorted(groups)
                runs = next(g for g in reports[report]["groups"] if g["name"] == group)["runs"]
                speeds = cost_rows(report)
                mean = sum(speeds[r["name"]] for r in runs) / len(runs)
                assert close(cells[header.index("train images/s")], mean), (page, cells[0], mean)
