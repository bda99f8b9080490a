"""Self-contained HTML pages: compare.py's report.html (the report, and a browser of every image of
the split) and caption.py's --html page. Everything is inside the one file: pictures as data URIs,
the captions and attention maps as JSON, the script and style of html/. No network, no server.

The data the script reads (see html/viewer.js; browser_data makes it from eval.py's per-image files):
    {"runs": [{"name", "label", "grid": the side of its attention maps' grid, or null}], "split",
     "scored": whether captions carry scores (filters and sort are shown then), "help": a line on top,
     "images": [{"src": data URI, "title", "refs": [reference, ...],
                 "caps": [per run: {"caption", "attention": base64 uint8 maps (results.attention_bytes),
                                    and from results.ImageRow "CIDEr", "exact_match", "right",
                                    "describes_scene", "scene_errors", "pointing"}]}]}
"""
import base64
import html
import io
import json
import os
import re
from dataclasses import asdict

import numpy as np
from PIL import Image
from tqdm import tqdm

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "html")


def image_uri(image, size=None):
    """3 x H x W uint8 -> a data URI, PNG or JPEG (quality 90), whichever is smaller; resized to
    size x size first when given and smaller than the image."""
    picture = Image.fromarray(np.ascontiguousarray(np.asarray(image).transpose(1, 2, 0)))
    if size and size < max(picture.size):
        picture = picture.resize((size, size), Image.BICUBIC)
    encoded = []
    for fmt, mime, options in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 90})):
        buf = io.BytesIO()
        picture.save(buf, format=fmt, **options)
        encoded.append((len(buf.getvalue()), mime, buf.getvalue()))
    _, mime, data = min(encoded)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# What the browser's script shows of each caption (results.ImageRow): not the statistics compare.py resamples.
PAGE_FIELDS = ("caption", "CIDEr", "exact_match", "describes_scene", "scene_errors", "pointing", "attention")


def browser_data(runs, picture, references, split, beam, thumb, limit=0):
    """The browser's data for report.html. runs: (name, label, results.ImageTable) per run, all over
    the same images; picture(i) and references(i): image i of the split (3 x H x W uint8) and its
    reference captions. Only the first `limit` images when it is not 0."""
    tables = [table for _, _, table in runs]
    images = []
    for k, row in enumerate(tqdm(tables[0].rows[:limit or None], desc="images for the browser", unit="image",
                                 leave=False)):
        caps = []
        for table in tables:
            cap = {key: v for key, v in asdict(table.rows[k]).items() if v is not None and key in PAGE_FIELDS}
            caps.append({**cap, "right": table.rows[k].right})
        title = f"{split} {row.index}" + (f" ({row.image_id})" if row.image_id != row.index else "")
        images.append({"src": image_uri(picture(row.index), thumb), "title": title, "refs": references(row.index),
                       "caps": caps})
    first = tables[0].rows[0]
    help_text = [f"Captions at beam {beam}; each with its own CIDEr against the image's references."]
    if any(t.attention_grid for t in tables):
        help_text.append("Hover over a word of the attention decoder, or click one and step with the arrow keys (up "
                         "and down: the next image), to see its attention map over the image, smoothed as "
                         "caption.py draws it.")
    help_text.append("Wrong means false of the scene: an object missed or invented, or a false relation."
                     if first.describes_scene is not None else "Wrong means matching none of the references word for "
                     "word.")
    if any(t.rows[0].pointing is not None for t in tables):
        help_text.append("A wavy underline marks a colour or shape word whose most attended cell lies on no such "
                         "object.")
    return {"runs": [{"name": name, "label": label, "grid": table.attention_grid} for name, label, table in runs],
            "split": split, "scored": True, "images": images, "help": " ".join(help_text)}


def file_uri(path):
    with open(path, "rb") as f:
        return f"data:image/png;base64,{base64.b64encode(f.read()).decode('ascii')}"


def inline(text):
    """Markdown's **bold**, *italic*, `code` and [links](url) in one line of escaped text."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s\"]+)\)", r'<a href="\2">\1</a>', text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", text)


def markdown(text, folder):
    """The Markdown compare.py writes (headings, paragraphs, lists with indented continuation lines,
    pipe tables, images of `folder` on their own line) -> HTML, the images inlined."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
            i += 1
        elif image := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip()):
            alt, src = image.groups()
            out.append(f'<p><img alt="{html.escape(alt)}" src="{file_uri(os.path.join(folder, src))}"></p>')
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.fullmatch(r"\|(-+\|)+", lines[i].strip()):
                    rows.append([c.strip() for c in lines[i].strip().strip("|").split(" | ")])
                i += 1
            head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
        elif line.startswith("- "):
            items = []
            while i < len(lines) and (lines[i].startswith("- ") or (items and lines[i].startswith("  "))):
                if lines[i].startswith("- "):
                    items.append([lines[i][2:]])
                else:
                    items[-1].append(lines[i].strip())
                i += 1
            out.append("<ul>" + "".join(f"<li>{'<br>'.join(map(inline, t))}</li>" for t in items) + "</ul>")
        else:
            text = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ", "![")):
                text.append(lines[i].strip())
                i += 1
            out.append(f"<p>{inline(' '.join(text))}</p>")
    return "\n".join(out)


def page(title, data=None, report=None):
    """The whole page: the report (HTML), the browser of `data`, or both as two views (the browser at
    #browse)."""
    with open(os.path.join(ASSETS, "viewer.css")) as f:
        style = f.read()
    with open(os.path.join(ASSETS, "viewer.js")) as f:
        script = f.read()
    body = []
    if report is not None and data:
        body.append(f'<nav><a href="#report">Report</a><a href="#browse">Browse the {len(data["images"])} '
                    f'{data["split"]} images</a></nav>')
    if report is not None:
        body.append(f'<section id="report-view">\n{report}\n</section>')
    if data:
        payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside
        body.append(f'<section id="browse-view" hidden>\n<div id="controls"></div>\n<p class="help">'
                    f'{html.escape(data.get("help", ""))}</p>\n<div id="rows"></div><div id="more"></div>\n</section>\n'
                    f'<script type="application/json" id="data">{payload}</script>')
    body = "\n".join(body)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>\n{style}</style>\n'
            f"</head>\n<body>\n{body}\n<script>\n{script}</script>\n</body>\n</html>\n")
