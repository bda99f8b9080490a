"use strict";
// The results browser of compare.py's report.html and caption.py's --html page: one renderer over the
// JSON in #data. Attention maps come as uint8 grids (one per word) and are smoothed here exactly as
// visualize.overlay() smooths them for the PNGs: skimage's resize(order=3, mode="edge"), that is a
// cubic B-spline through the grid values, sampled at pixel centres and clipped to the grid's range.

const DATA_ELEMENT = document.getElementById("data");  // absent: a report without the browser
const DATA = DATA_ELEMENT ? JSON.parse(DATA_ELEMENT.textContent) : null;
const SIZE = 224;      // canvas side in pixels
const CHUNK = 40;      // rows rendered at a time; more as the list is scrolled
const Z = Math.sqrt(3) - 2, PAD = 12;  // the cubic B-spline's pole; edge padding, as scipy pads

// B-spline coefficients of one edge-padded line, in place (the constant padding makes the boundary
// start exact to Z^12 ~ 1e-7).
function prefilter(line) {
  const n = line.length;
  for (let i = 0; i < n; i++) line[i] *= 6;
  line[0] /= 1 - Z;
  for (let i = 1; i < n; i++) line[i] += Z * line[i - 1];
  line[n - 1] = (Z / (Z * Z - 1)) * (line[n - 1] + Z * line[n - 2]);
  for (let i = n - 2; i >= 0; i--) line[i] = Z * (line[i + 1] - line[i]);
}

function splineWeights(t) {
  const s = 1 - t;
  return [s * s * s / 6, (4 - 6 * t * t + 3 * t * t * t) / 6, (1 + 3 * t + 3 * t * t - 3 * t * t * t) / 6,
          t * t * t / 6];
}

// grid: g*g values, row-major (y, x) -> Float64Array of n*n values.
function smooth(grid, g, n) {
  const m = g + 2 * PAD, c = new Float64Array(m * m), line = new Float64Array(m);
  const edge = v => Math.min(Math.max(v - PAD, 0), g - 1);
  for (let y = 0; y < m; y++) for (let x = 0; x < m; x++) c[y * m + x] = grid[edge(y) * g + edge(x)];
  for (let y = 0; y < m; y++) {
    for (let x = 0; x < m; x++) line[x] = c[y * m + x];
    prefilter(line);
    for (let x = 0; x < m; x++) c[y * m + x] = line[x];
  }
  for (let x = 0; x < m; x++) {
    for (let y = 0; y < m; y++) line[y] = c[y * m + x];
    prefilter(line);
    for (let y = 0; y < m; y++) c[y * m + x] = line[y];
  }
  const first = new Int32Array(n), w = [];
  for (let k = 0; k < n; k++) {  // output pixel k sits at (k + 0.5) * g / n - 0.5 in grid cells
    const p = (k + 0.5) * g / n - 0.5 + PAD, i = Math.floor(p);
    first[k] = i - 1;
    w.push(splineWeights(p - i));
  }
  const rows = new Float64Array(m * n);  // m x n: along x first
  for (let y = 0; y < m; y++) for (let k = 0; k < n; k++) {
    let v = 0;
    for (let j = 0; j < 4; j++) v += c[y * m + first[k] + j] * w[k][j];
    rows[y * n + k] = v;
  }
  let lo = Infinity, hi = -Infinity;
  for (const v of grid) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const out = new Float64Array(n * n);
  for (let k = 0; k < n; k++) for (let x = 0; x < n; x++) {
    let v = 0;
    for (let j = 0; j < 4; j++) v += rows[(first[k] + j) * n + x] * w[k][j];
    out[k * n + x] = Math.min(hi, Math.max(lo, v));
  }
  return out;
}

// The image, and over it one word's map as overlay() draws it: grey levels scaled to the smoothed
// map's own range (imshow's default), white where attended, blended at alpha 0.6.
function draw(canvas, img, amap, g) {
  const ctx = canvas.getContext("2d"), n = canvas.width;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(img, 0, 0, n, n);
  if (!amap) return;
  const s = smooth(amap, g, n);
  let lo = Infinity, hi = -Infinity;
  for (const v of s) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const px = ctx.getImageData(0, 0, n, n), d = px.data, span = hi - lo || 1;
  for (let i = 0; i < n * n; i++) {
    const v = 255 * (s[i] - lo) / span;
    for (let ch = 0; ch < 3; ch++) d[4 * i + ch] = 0.4 * d[4 * i + ch] + 0.6 * v;
  }
  ctx.putImageData(px, 0, 0);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function maps(b64) {  // base64 of words x g*g uint8 -> Uint8Array
  const raw = atob(b64), out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function captionBlock(run, cap, canvas, img, label) {
  const block = el("div", "cap");
  block.appendChild(el("div", "run", run.label));
  const line = el("div", "words");
  const words = cap.caption ? cap.caption.split(" ") : [];
  const att = run.grid && cap.attention ? maps(cap.attention) : null;
  const cells = run.grid * run.grid;
  words.forEach((word, k) => {
    const span = el("span", "w", word);
    if (cap.pointing && cap.pointing[k] === 0) {
      span.classList.add("miss");
      span.title = "its most attended cell is on no object of this colour or shape";
    }
    if (att) {
      span.tabIndex = 0;
      span.classList.add("att");
      const show = () => {
        draw(canvas, img, att.subarray(k * cells, (k + 1) * cells), run.grid);
        label.textContent = `${run.name}: "${word}" (word ${k + 1} of ${words.length})`;
        line.querySelectorAll(".on").forEach(e => e.classList.remove("on"));
        span.classList.add("on");
      };
      span.addEventListener("mouseenter", show);
      span.addEventListener("focus", show);
      span.addEventListener("keydown", ev => step(ev, span));
    }
    line.appendChild(span);
    line.appendChild(document.createTextNode(" "));
  });
  if (!words.length) line.appendChild(el("span", "empty", "(empty caption)"));
  if (att) line.addEventListener("mouseleave", () => {
    if (!line.contains(document.activeElement)) { draw(canvas, img, null); label.textContent = ""; }
  });
  block.appendChild(line);
  const badges = el("div", "badges");
  if (cap.CIDEr !== undefined) badges.appendChild(el("span", "badge", `CIDEr ${cap.CIDEr.toFixed(3)}`));
  if (cap.exact_match !== undefined)
    badges.appendChild(el("span", cap.exact_match ? "badge ok" : "badge", cap.exact_match ? "exact match" : "no exact match"));
  if (cap.scene_errors) {
    const e = cap.scene_errors;
    if (cap.describes_scene) badges.appendChild(el("span", "badge ok", "true of the scene"));
    for (const r of e.false) badges.appendChild(el("span", "badge bad", `false: ${r}`));
    for (const o of e.missing) badges.appendChild(el("span", "badge bad", `missing: ${o}`));
    for (const o of e.invented) badges.appendChild(el("span", "badge bad", `invented: ${o}`));
  }
  block.appendChild(badges);
  return block;
}

// Arrow keys step through a caption's words (left, right) and between images (up, down).
function step(ev, span) {
  const all = [...span.parentNode.querySelectorAll(".att")], k = all.indexOf(span);
  let target = null;
  if (ev.key === "ArrowRight") target = all[Math.min(k + 1, all.length - 1)];
  else if (ev.key === "ArrowLeft") target = all[Math.max(k - 1, 0)];
  else if (ev.key === "Home") target = all[0];
  else if (ev.key === "End") target = all[all.length - 1];
  else if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
    const rows = [...document.querySelectorAll("#rows .row")], r = rows.indexOf(span.closest(".row"));
    const next = rows[r + (ev.key === "ArrowDown" ? 1 : -1)];
    target = next && next.querySelector(".att");
  }
  if (target) { ev.preventDefault(); target.focus(); target.scrollIntoView({block: "nearest"}); }
}

function renderRow(item) {
  const row = el("div", "row");
  const fig = el("figure");
  const canvas = el("canvas");
  canvas.width = canvas.height = SIZE;
  const img = new Image();
  img.onload = () => draw(canvas, img, null);
  img.src = item.src;
  const label = el("figcaption", "word");
  fig.appendChild(canvas);
  fig.appendChild(el("figcaption", "title", item.title));
  fig.appendChild(label);
  row.appendChild(fig);
  if (item.refs.length) {
    const refs = el("div", "refs");
    refs.appendChild(el("div", "run", `references (${item.refs.length})`));
    const list = el("ol");
    for (const r of item.refs) list.appendChild(el("li", "", r));
    refs.appendChild(list);
    row.appendChild(refs);
  }
  DATA.runs.forEach((run, r) => row.appendChild(captionBlock(run, item.caps[r], canvas, img, label)));
  return row;
}

// --------------------------------------------------------------------------- filters, sort, paging

const $ = id => document.getElementById(id);
let order = [], shown = 0;

function selected() {
  const f = $("filter") ? $("filter").value : "all";
  const x = $("run-x") ? +$("run-x").value : 0, y = $("run-y") ? +$("run-y").value : 0;
  let ids = DATA.images.map((_, i) => i).filter(i => {
    const caps = DATA.images[i].caps;
    if (f === "disagree") return new Set(caps.map(c => c.caption)).size > 1;
    if (f === "x-wrong") return !caps[x].right && caps[y].right;
    if (f === "pointing") return caps.some(c => c.pointing && c.pointing.includes(0));
    return true;
  });
  const s = $("sort") ? $("sort").value : "index";
  if (s !== "index") {
    const d = i => DATA.images[i].caps[y].CIDEr - DATA.images[i].caps[x].CIDEr;
    ids.sort((a, b) => (s === "diff-desc" ? d(b) - d(a) : d(a) - d(b)) || a - b);
  }
  return ids;
}

function more() {
  const rows = $("rows"), end = Math.min(shown + CHUNK, order.length);
  for (; shown < end; shown++) rows.appendChild(renderRow(DATA.images[order[shown]]));
}

function refresh() {
  order = selected();
  shown = 0;
  $("rows").replaceChildren();
  more();
  $("count").textContent = `${order.length} of ${DATA.images.length} images`;
}

function option(select, value, text) {
  const o = el("option", "", text);
  o.value = value;
  select.appendChild(o);
}

function controls() {
  const bar = $("controls");
  bar.hidden = !DATA.scored;  // a caption.py page: nothing to filter or sort by
  if (DATA.scored) selectors(bar);
  bar.appendChild(el("span", "count")).id = "count";
}

function selectors(bar) {
  const add = (text, select) => { const l = el("label", "", text + " "); l.appendChild(select); bar.appendChild(l); };
  const filter = el("select"), x = el("select"), y = el("select"), sort = el("select");
  filter.id = "filter"; x.id = "run-x"; y.id = "run-y"; sort.id = "sort";
  option(filter, "all", "all images");
  option(filter, "disagree", "the runs disagree");
  option(filter, "x-wrong", "run X wrong, run Y right");
  if (DATA.images.some(im => im.caps.some(c => c.pointing))) option(filter, "pointing", "pointing missed");
  DATA.runs.forEach((run, r) => { option(x, r, run.label); option(y, r, run.label); });
  y.value = DATA.runs.length > 1 ? 1 : 0;
  option(sort, "index", `${DATA.split} order`);
  option(sort, "diff-desc", "CIDEr of Y - X, largest first");
  option(sort, "diff-asc", "CIDEr of Y - X, smallest first");
  add("show", filter); add("X", x); add("Y", y); add("sort", sort);
  for (const s of [filter, x, y, sort]) s.addEventListener("change", refresh);
}

function tabs() {
  const report = $("report-view");
  if (!report) { $("browse-view").hidden = false; return; }
  if (!DATA) return;  // the report alone
  const show = () => {
    const browse = location.hash === "#browse";
    report.hidden = browse;
    $("browse-view").hidden = !browse;
    document.querySelectorAll("nav a").forEach(a => a.classList.toggle("current", a.hash === (browse ? "#browse" : "#report")));
  };
  window.addEventListener("hashchange", show);
  show();
}

// The report's wide figures (the attention overlays) fit the window; a click shows one at full size.
document.querySelectorAll("#report-view img").forEach(img => img.addEventListener("click", () => img.classList.toggle("full")));

if (DATA) {
  controls();
  new IntersectionObserver(entries => { if (entries.some(e => e.isIntersecting)) more(); }).observe($("more"));
  refresh();
}
tabs();
