"""The review page's HTML and script (served by edge_agent/service/review_page.py; a static asset, no logic).

The mask editor draws on a canvas over the raw frame: the model's mask in red, polygons added (red) or
erased; what it sends is the polygons (``mask_edit``), and the server computes the stored mask from the
kept mask.png with the same rule (review.py ``MaskEdit.apply``), so the picture and the file agree.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>U-Flow review</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 12px; background: #111; color: #eee; }
 .card { margin: 8px 0; padding: 8px; border: 1px solid #444; }
 .pair { display: flex; gap: 8px; align-items: flex-start; flex-wrap: wrap; }
 .pair figure { margin: 0; }
 .pair img { height: 240px; image-rendering: pixelated; display: block; border: 1px solid #333; }
 .pair figcaption { font-size: 12px; color: #aaa; }
 .strip { max-width: 100%; display: block; margin-top: 6px; }
 .caption { font-weight: 600; margin: 4px 0; }
 .bad { color: #ff6b6b; } .good { color: #7bd88f; }
 button { margin: 4px 4px 0 0; } button.on { background: #2a5; color: #fff; }
 #editor { position: fixed; inset: 20px; background: #1b1b1b; border: 1px solid #666; padding: 10px; overflow: auto; }
 #editor canvas { image-rendering: pixelated; cursor: crosshair; border: 1px solid #555; }
</style></head>
<body>
<h1>U-Flow review</h1>
<div id="filters">
 <button data-kind="" class="filter on">All</button>
 <button data-kind="part" class="filter">Rejected parts</button>
 <button data-kind="flagged" class="filter">Flagged frames</button>
 <button data-kind="good" class="filter">Good samples</button>
 <button id="undo" disabled>Undo last decision</button>
</div>
<p id="summary">loading...</p>
<div id="frames"></div>
<div id="paging"><button id="prev">&larr; newer</button> <span id="page">-</span> <button id="next">older &rarr;</button></div>
<div id="editor" hidden>
 <div class="caption" id="editor-title"></div>
 <div>
  <button id="mode-add" class="on">Add polygon</button><button id="mode-erase">Erase polygon</button>
  <button id="close-polygon">Close polygon</button><button id="start-empty">Start from empty</button>
  <button id="reset">Back to the model's mask</button>
 </div>
 <p>Click points on the frame; "Close polygon" (or a double click) fills it. Red: the mask that will be stored.</p>
 <canvas id="canvas"></canvas>
 <div><button id="save-mask">Confirmed defect with this mask</button><button id="cancel">Cancel</button></div>
</div>
<script>
const PAGE_SIZE = 6;
let kind = "", offset = 0, undoStack = [];
const image = (id, file) => "/review/image?id=" + encodeURIComponent(id) + "&file=" + file;
const say = text => { document.getElementById("summary").textContent = text; };
async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json",
    "X-Edge-Agent": "review"}, body: JSON.stringify(body)});
  return response.json();
}
async function decide(id, decision, maskEdit) {
  const body = {id: id, decision: decision};
  if (maskEdit) body.mask_edit = maskEdit;
  const result = await post("/review/decide", body);
  say(result.message);
  if (result.ok) { undoStack.push(id); document.getElementById("undo").disabled = false; await load(); }
  return result;
}
document.getElementById("undo").onclick = async () => {
  const id = undoStack.pop();
  if (!id) return;
  const result = await post("/review/undo", {id: id});
  say(result.message);
  document.getElementById("undo").disabled = undoStack.length === 0;
  await load();
};
function figure(src, text, cls) {
  const f = document.createElement("figure");
  const img = document.createElement("img"); img.src = src; img.className = cls; img.alt = text;
  const c = document.createElement("figcaption"); c.textContent = text;
  f.append(img, c); return f;
}
function card(frame) {
  const div = document.createElement("div");
  div.className = "card"; div.id = "card-" + frame.id; div.dataset.kind = frame.kind;
  const caption = document.createElement("div");
  caption.className = "caption " + (frame.anomalous ? "bad" : "good");
  caption.textContent = frame.caption;
  const pair = document.createElement("div"); pair.className = "pair";
  pair.append(figure(image(frame.id, "frame.png"), "raw frame", "raw"),
              figure(image(frame.id, "overlay.png"), "overlay: map, NFA outline" +
                     (frame.kind === "part" ? ", the part outlined" : ""), "overlay"));
  const text = document.createElement("div");
  text.textContent = frame.kind + " · frame " + frame.sequence + " · " + frame.regions + " region(s) · " + frame.model;
  div.append(caption, pair);
  if (frame.kind === "part") {
    const strip = document.createElement("img");
    strip.src = image(frame.id, "strip.png"); strip.className = "strip"; strip.alt = "the part's frames";
    div.append(strip);
  }
  const buttons = [["Mark as good", "mark-good", () => decide(frame.id, "good")],
                   ["Confirmed defect", "confirm-defect", () => decide(frame.id, "defect")],
                   ["Edit mask", "edit-mask", () => openEditor(frame)]];
  div.append(text);
  for (const [label, cls, action] of buttons) {
    const b = document.createElement("button"); b.textContent = label; b.className = cls; b.onclick = action;
    div.append(b);
  }
  return div;
}
async function load() {
  const query = "?offset=" + offset + "&limit=" + PAGE_SIZE + (kind ? "&kind=" + kind : "");
  const data = await (await fetch("/review.json" + query, {cache: "no-store"})).json();
  if (data.frames.length === 0 && offset > 0) { offset = Math.max(0, offset - PAGE_SIZE); return load(); }
  document.getElementById("frames").replaceChildren(...data.frames.map(card));
  const pages = Math.max(1, Math.ceil(data.total / PAGE_SIZE));
  document.getElementById("page").textContent = "page " + (Math.floor(offset / PAGE_SIZE) + 1) + " of " + pages +
    " (" + data.total + " kept)";
  document.getElementById("prev").disabled = offset === 0;
  document.getElementById("next").disabled = offset + PAGE_SIZE >= data.total;
  const c = data.counts;
  document.getElementById("filters").dataset.counts = JSON.stringify(c);
  if (document.getElementById("summary").textContent === "loading...")
    say(c.part + " rejected part(s), " + c.flagged + " flagged frame(s), " + c.good + " good sample(s); decisions go to " +
        data.training_dir);
}
for (const button of document.querySelectorAll(".filter")) {
  button.onclick = () => {
    kind = button.dataset.kind; offset = 0;
    document.querySelectorAll(".filter").forEach(b => b.classList.toggle("on", b === button));
    load();
  };
}
document.getElementById("prev").onclick = () => { offset = Math.max(0, offset - PAGE_SIZE); load(); };
document.getElementById("next").onclick = () => { offset += PAGE_SIZE; load(); };

// -- the mask editor ---------------------------------------------------------------------------
const editor = {frame: null, base: "model", add: [], erase: [], points: [], mode: "add", raw: null, model: null,
                scale: 1};
const canvas = document.getElementById("canvas");
function loadImage(src) {
  return new Promise((resolve, reject) => { const i = new Image(); i.onload = () => resolve(i); i.onerror = reject;
                                            i.src = src; });
}
async function openEditor(frame) {
  editor.frame = frame; editor.base = "model"; editor.add = []; editor.erase = []; editor.points = [];
  editor.raw = await loadImage(image(frame.id, "frame.png"));
  editor.model = await loadImage(image(frame.id, "mask.png"));
  editor.scale = Math.max(1, Math.ceil(480 / editor.raw.naturalWidth));
  canvas.width = editor.raw.naturalWidth * editor.scale; canvas.height = editor.raw.naturalHeight * editor.scale;
  document.getElementById("editor-title").textContent = "Mask of " + frame.caption;
  document.getElementById("editor").hidden = false;
  draw();
}
function setMode(mode) {
  editor.mode = mode;
  document.getElementById("mode-add").classList.toggle("on", mode === "add");
  document.getElementById("mode-erase").classList.toggle("on", mode === "erase");
}
function currentMask() {
  const w = editor.raw.naturalWidth, h = editor.raw.naturalHeight;
  const m = document.createElement("canvas"); m.width = w; m.height = h;
  const g = m.getContext("2d");
  g.fillStyle = "#000"; g.fillRect(0, 0, w, h);
  if (editor.base === "model") g.drawImage(editor.model, 0, 0, w, h);
  for (const [polygons, colour] of [[editor.add, "#fff"], [editor.erase, "#000"]]) {
    g.fillStyle = colour;
    for (const p of polygons) { g.beginPath(); p.forEach(([x, y], i) => i ? g.lineTo(x, y) : g.moveTo(x, y));
                                g.closePath(); g.fill(); }
  }
  return g.getImageData(0, 0, w, h);
}
function draw() {
  const g = canvas.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.drawImage(editor.raw, 0, 0, canvas.width, canvas.height);
  const mask = currentMask();
  const layer = document.createElement("canvas"); layer.width = mask.width; layer.height = mask.height;
  const lg = layer.getContext("2d"); const out = lg.createImageData(mask.width, mask.height);
  let pixels = 0;
  for (let i = 0; i < mask.data.length; i += 4) {
    if (mask.data[i] > 127) { out.data[i] = 255; out.data[i + 3] = 110; pixels++; }
  }
  lg.putImageData(out, 0, 0);
  g.drawImage(layer, 0, 0, canvas.width, canvas.height);
  canvas.dataset.maskPixels = pixels;
  g.strokeStyle = editor.mode === "add" ? "#ff0" : "#0ff"; g.lineWidth = 2; g.beginPath();
  editor.points.forEach(([x, y], i) => { const X = x * editor.scale, Y = y * editor.scale;
                                         i ? g.lineTo(X, Y) : g.moveTo(X, Y); g.fillRect(X - 2, Y - 2, 4, 4); });
  g.stroke();
}
canvas.addEventListener("click", event => {
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width / editor.scale;
  const y = (event.clientY - box.top) * canvas.height / box.height / editor.scale;
  editor.points.push([Math.round(x * 10) / 10, Math.round(y * 10) / 10]); draw();
});
function closePolygon() {
  if (editor.points.length >= 3) (editor.mode === "add" ? editor.add : editor.erase).push(editor.points);
  editor.points = []; draw();
}
canvas.addEventListener("dblclick", closePolygon);
document.getElementById("close-polygon").onclick = closePolygon;
document.getElementById("mode-add").onclick = () => setMode("add");
document.getElementById("mode-erase").onclick = () => setMode("erase");
document.getElementById("start-empty").onclick = () => { editor.base = "empty"; draw(); };
document.getElementById("reset").onclick = () => { editor.base = "model"; editor.add = []; editor.erase = [];
                                                   editor.points = []; draw(); };
document.getElementById("cancel").onclick = () => { document.getElementById("editor").hidden = true; };
document.getElementById("save-mask").onclick = async () => {
  closePolygon();
  const result = await decide(editor.frame.id, "defect", {base: editor.base, add: editor.add, erase: editor.erase});
  if (result.ok) document.getElementById("editor").hidden = true;
};
load();
</script>
</body></html>
"""
