"""The explorer page: HTML, CSS and JavaScript with three placeholders filled by `vitkit.viz.explorer`.

Kept in a Python module (not a loose .html file) so it ships with the package without package-data rules.
Placeholders: {{TITLE}} (HTML-escaped text), {{SCRIPT_HASH}} (CSP hash of the script), {{DATA}} (JSON with `<`,
`>` and `&` escaped, so it can never close its <script> element). The script only ever writes user strings with
`textContent`, and the Content-Security-Policy allows no network and no script but this one, so even an
unescaped string could not run.
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src '{{SCRIPT_HASH}}'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  .sub { color: #666; margin-bottom: 12px; }
  .row { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
  .stage { position: relative; line-height: 0; border: 1px solid #ccc; background: #000; cursor: crosshair; }
  .stage img, .stage canvas { position: absolute; left: 0; top: 0; }
  .stage img { position: static; image-rendering: pixelated; }
  .panel { min-width: 260px; max-width: 420px; }
  fieldset { border: 1px solid #ddd; margin: 0 0 10px; padding: 6px 10px; }
  legend { color: #555; font-size: 12px; }
  label { margin-right: 10px; white-space: nowrap; }
  select { margin-left: 4px; }
  #caption { margin-top: 8px; color: #333; min-height: 2.8em; }
  #preds { list-style: none; padding: 0; margin: 0; }
  #preds li { margin: 3px 0; padding: 3px 6px; border-radius: 4px; cursor: pointer; border: 1px solid transparent; }
  #preds li.active { border-color: #2a6; background: #eef8f1; }
  #preds .bar { height: 6px; background: #4a7bd0; border-radius: 3px; margin-top: 2px; }
  #preds .name { font-weight: 600; word-break: break-all; }
  #preds .prob { float: right; color: #555; font-variant-numeric: tabular-nums; }
  .hint { color: #777; font-size: 12px; }
</style>
</head>
<body>
<h1>{{TITLE}}</h1>
<div class="sub" id="model-info"></div>
<div class="row">
  <div id="left">
    <div class="stage" id="stage">
      <img id="photo" alt="input image">
      <canvas id="heat"></canvas>
      <canvas id="marks"></canvas>
    </div>
    <div id="caption"></div>
    <div class="hint">Hover a patch to see its attention; click to pin it (click again to release).</div>
    <div id="prediction-box" style="display: none"><div class="hint" id="prediction-caption"></div></div>
  </div>
  <div class="panel">
    <fieldset id="image-box"><legend>image</legend><select id="image-select"></select></fieldset>
    <fieldset>
      <legend>map</legend>
      <label><input type="radio" name="mode" value="attention" checked> attention (per patch)</label>
      <label><input type="radio" name="mode" value="rollout"> rollout</label>
      <label id="flow-mode"><input type="radio" name="mode" value="flow"> flow</label>
      <label><input type="radio" name="mode" value="grad_rollout"> grad-rollout</label>
      <label><input type="radio" name="mode" value="relevance"> relevance</label>
      <label><input type="radio" name="mode" value="gradcam"> class region (Seg-Grad-CAM)</label>
      <label><input type="radio" name="mode" value="cross_attention"> query cross-attention</label>
    </fieldset>
    <fieldset>
      <legend>attention source</legend>
      <label>layer<select id="layer"></select></label>
      <label>head<select id="head"></select></label>
    </fieldset>
    <fieldset>
      <legend>display</legend>
      <label>opacity <input type="range" id="opacity" min="0" max="100" value="60"></label>
      <label><input type="checkbox" id="smooth" checked> smooth</label>
    </fieldset>
    <fieldset>
      <legend id="preds-legend">top predictions (click: explain that class)</legend>
      <ol id="preds"></ol>
    </fieldset>
  </div>
</div>
<script type="application/json" id="vitkit-data">{{DATA}}</script>
<script>{{SCRIPT}}</script>
</body>
</html>
"""

SCRIPT = """
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("vitkit-data").textContent);
  const M = DATA.model;
  const GH = M.grid[0], GW = M.grid[1], NP = GH * GW, NH = M.heads;
  const $ = (id) => document.getElementById(id);
  const b64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
  const LUT = b64(DATA.colormap);  // 256 RGB triples
  // The maps this page offers (a segmentation model or detector has its own class maps) and the one a click shows.
  const MODES = DATA.settings.modes || ["attention", "rollout", "flow", "grad_rollout", "relevance"];
  const CLASS_MODE = DATA.settings.class_mode || "relevance";
  const state = { image: 0, mode: "attention", layer: M.layers.length - 1, head: NH, query: -1, pinned: false, target: 0 };
  const cache = {};
  const photo = $("photo"), heat = $("heat"), marks = $("marks"), stage = $("stage");
  const off = document.createElement("canvas");
  off.width = GW; off.height = GH;

  function attn(i) {  // uint8 (layers, heads + 1, 1 + patches, patches), decoded once per image
    if (!cache[i]) cache[i] = b64(DATA.images[i].attention);
    return cache[i];
  }

  function currentMap() {
    const img = DATA.images[state.image];
    if (state.mode === "attention") {
      const q = state.query < 0 ? 0 : state.query + 1;
      const start = ((state.layer * (NH + 1) + state.head) * (NP + 1) + q) * NP;
      return attn(state.image).subarray(start, start + NP);
    }
    if (state.mode === "rollout") return img.rollout;
    if (state.mode === "flow") return img.flow;
    return img.targets[state.target][state.mode];
  }

  function render() {
    const values = currentMap();
    let hi = 0;
    for (let i = 0; i < NP; i++) hi = Math.max(hi, values[i]);
    const px = new ImageData(GW, GH);
    let checksum = 0;
    for (let i = 0; i < NP; i++) {
      const v = hi > 0 ? Math.round((255 * values[i]) / hi) : 0;
      checksum = (checksum * 31 + v + 1) % 1000000007;
      px.data[4 * i] = LUT[3 * v];
      px.data[4 * i + 1] = LUT[3 * v + 1];
      px.data[4 * i + 2] = LUT[3 * v + 2];
      px.data[4 * i + 3] = 255;
    }
    off.getContext("2d").putImageData(px, 0, 0);
    const ctx = heat.getContext("2d");
    ctx.clearRect(0, 0, heat.width, heat.height);
    ctx.imageSmoothingEnabled = $("smooth").checked;
    ctx.drawImage(off, 0, 0, heat.width, heat.height);
    heat.style.opacity = String($("opacity").value / 100);
    heat.dataset.mode = state.mode;
    heat.dataset.layer = String(M.layers[state.layer]);
    heat.dataset.head = state.head === NH ? "mean" : String(state.head);
    heat.dataset.query = state.query < 0 ? "cls" : String(state.query);
    heat.dataset.target = String(DATA.images[state.image].targets[state.target].index);
    heat.dataset.checksum = String(checksum);
    drawMarks();
    describe();
  }

  function drawMarks() {
    const ctx = marks.getContext("2d");
    const sx = marks.width / GW, sy = marks.height / GH;
    ctx.clearRect(0, 0, marks.width, marks.height);
    ctx.strokeStyle = "rgba(255,255,255,0.35)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let c = 1; c < GW; c++) { ctx.moveTo(c * sx + 0.5, 0); ctx.lineTo(c * sx + 0.5, marks.height); }
    for (let r = 1; r < GH; r++) { ctx.moveTo(0, r * sy + 0.5); ctx.lineTo(marks.width, r * sy + 0.5); }
    ctx.stroke();
    if (state.mode === "attention" && state.query >= 0) {
      const r = Math.floor(state.query / GW), c = state.query % GW;
      ctx.strokeStyle = state.pinned ? "#00ff88" : "#ffffff";
      ctx.lineWidth = 2;
      ctx.strokeRect(c * sx + 1, r * sy + 1, sx - 2, sy - 2);
    }
  }

  function describe() {
    const img = DATA.images[state.image];
    const t = img.targets[state.target];
    let text;
    if (state.mode === "attention") {
      const who = state.query < 0 ? M.query_name
        : "patch (row " + Math.floor(state.query / GW) + ", col " + (state.query % GW) + ")" + (state.pinned ? ", pinned" : "");
      const head = state.head === NH ? "mean of " + NH + " heads" : "head " + state.head;
      text = "Attention of " + who + " over the patches, layer " + M.layers[state.layer] + ", " + head + ".";
    } else if (state.mode === "rollout") {
      text = "Attention rollout (" + DATA.settings.head_fusion + " over heads, discard " + DATA.settings.discard_ratio + ") from the " + M.query_name + ".";
    } else if (state.mode === "flow") {
      text = "Attention flow (max-flow through the " + DATA.settings.head_fusion + "-fused layers, discard " + DATA.settings.discard_ratio + ") to the " + M.query_name + ".";
    } else if (state.mode === "gradcam") {
      text = "Seg-Grad-CAM: why the pixels predicted \u201c" + t.name + "\u201d (" + (100 * t.prob).toFixed(1) + "% of the image) are that class.";
    } else if (state.mode === "cross_attention") {
      text = "Decoder cross-attention of " + t.name + " (score " + t.prob.toFixed(2) + ") over the patches.";
    } else {
      text = (state.mode === "relevance" ? "Gradient x attention relevance" : "Gradient-weighted rollout") + " for class \u201c" + t.name + "\u201d.";
    }
    $("caption").textContent = text;
  }

  function patchAt(ev) {
    const rect = heat.getBoundingClientRect();
    const c = Math.floor(((ev.clientX - rect.left) / rect.width) * GW);
    const r = Math.floor(((ev.clientY - rect.top) / rect.height) * GH);
    if (r < 0 || c < 0 || r >= GH || c >= GW) return -1;
    return r * GW + c;
  }

  function loadImage(i) {
    state.image = i;
    state.target = 0;
    state.query = -1;
    state.pinned = false;
    const img = DATA.images[i];
    const scale = Math.max(1, Math.floor(448 / Math.max(img.width, img.height)));
    const w = img.width * scale, h = img.height * scale;
    photo.src = "data:image/png;base64," + img.png;
    photo.width = w; photo.height = h;
    for (const cv of [heat, marks]) { cv.width = w; cv.height = h; cv.style.width = w + "px"; cv.style.height = h + "px"; }
    stage.style.width = w + "px"; stage.style.height = h + "px";
    $("left").style.width = w + "px";  // fixed, so a longer caption does not push the controls around
    const list = $("preds");
    list.replaceChildren();
    img.targets.forEach((t, k) => {
      const li = document.createElement("li");
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = (100 * t.prob).toFixed(1) + "%";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = t.name;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = Math.max(1, Math.round(100 * t.prob)) + "%";
      li.append(prob, name, bar);
      li.dataset.index = String(t.index);
      li.addEventListener("click", () => { state.target = k; markTarget(); if (state.mode === "attention") setMode(CLASS_MODE); else render(); });
      list.append(li);
    });
    const box = $("prediction-box");
    box.style.display = img.prediction ? "" : "none";
    if (img.prediction) {  // a dense model's mask or boxes; the <img> exists only on such pages
      let pred = $("prediction");
      if (!pred) {
        pred = document.createElement("img");
        pred.id = "prediction";
        pred.alt = "the model's prediction";
        pred.style.imageRendering = "pixelated";
        box.append(pred);
      }
      pred.src = "data:image/png;base64," + img.prediction;
      pred.width = w; pred.height = h;
      $("prediction-caption").textContent = M.kind === "detection" ? "predicted boxes (the listed queries)" : "predicted mask";
    }
    markTarget();
    render();
  }

  function markTarget() {
    [...$("preds").children].forEach((li, k) => li.classList.toggle("active", k === state.target));
  }

  function setMode(mode) {
    state.mode = mode;
    for (const r of document.querySelectorAll("input[name=mode]")) r.checked = r.value === mode;
    render();
  }

  // Controls.
  $("model-info").textContent = M.description;
  M.layers.forEach((l, i) => $("layer").append(new Option("layer " + l, String(i))));
  $("layer").value = String(state.layer);
  $("head").append(new Option("mean", String(NH)));
  for (let h = 0; h < NH; h++) $("head").append(new Option("head " + h, String(h)));
  $("head").value = String(NH);
  DATA.images.forEach((img, i) => $("image-select").append(new Option(img.name, String(i))));
  if (DATA.images.length < 2) $("image-box").style.display = "none";
  if (!DATA.settings.flow) $("flow-mode").style.display = "none";  // attention flow is opt-in (it costs seconds)
  for (const r of document.querySelectorAll("input[name=mode]")) {
    if (!MODES.includes(r.value)) r.closest("label").style.display = "none";
  }
  if (DATA.settings.targets_legend) $("preds-legend").textContent = DATA.settings.targets_legend;
  $("image-select").addEventListener("change", (e) => loadImage(Number(e.target.value)));
  $("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); setMode("attention"); });
  $("head").addEventListener("change", (e) => { state.head = Number(e.target.value); setMode("attention"); });
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", () => setMode(r.value));
  $("opacity").addEventListener("input", render);
  $("smooth").addEventListener("change", render);
  marks.addEventListener("mousemove", (ev) => {
    if (state.pinned) return;
    const p = patchAt(ev);
    if (p !== state.query) { state.query = p; if (state.mode === "attention") render(); else drawMarks(); }
  });
  marks.addEventListener("mouseleave", () => { if (!state.pinned) { state.query = -1; render(); } });
  marks.addEventListener("click", (ev) => {
    const p = patchAt(ev);
    if (state.pinned && p === state.query) { state.pinned = false; }
    else { state.pinned = p >= 0; state.query = p; }
    if (state.mode !== "attention") setMode("attention"); else render();
  });
  loadImage(0);
  document.body.dataset.ready = "1";
})();
"""
