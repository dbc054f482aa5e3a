// cnnkit web app: classifies images on this device with ONNX Runtime Web (WebAssembly).
// config.json says how cnnkit prepares an image (cnnkit/data/decode.py, to_input_tensor);
// prepare() below does the same on a canvas and hands the model uint8 NCHW pixels, which
// the ONNX graph normalises itself.
const $ = (id) => document.getElementById(id);
const TOP_K = 5;
let ort = null, session = null, config = null;
let queue = Promise.resolve();  // one inference at a time: a session runs one call at once
let current = 0;  // the latest image's number: older results are not shown over it
let stream = null;

// The service worker precaches every file of this folder: offline after the first visit.
if ("serviceWorker" in navigator) {
  navigator.serviceWorker.register("sw.js").then(() => navigator.serviceWorker.ready)
    .then(() => { $("offline").textContent = "Works offline: every file is saved on this device."; })
    .catch((e) => { $("offline").textContent = "Offline use unavailable: " + e.message; });
} else {
  $("offline").textContent = "Offline use needs HTTPS (or localhost) and a recent browser.";
}

function fail(message) {
  $("error").textContent = message;
  $("label").textContent = ""; $("bars").innerHTML = ""; $("timing").textContent = "";
}

async function load() {
  config = await (await fetch("config.json")).json();
  ort = await import("./ort/ort.wasm.bundle.min.js");
  // Single-threaded: a static host sends no COOP/COEP headers, so no SharedArrayBuffer.
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.proxy = false;
  // Only the .wasm is a file of its own (a prefix string would fetch the glue .mjs too,
  // which the bundle has inside it).
  ort.env.wasm.wasmPaths = { wasm: new URL("ort/ort-wasm-simd-threaded.wasm", location.href).href };
  session = await ort.InferenceSession.create(config.model.file, {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
  });
  const pre = config.preprocessing;
  const parts = [config.title];
  if (typeof config.val_accuracy === "number")
    parts.push("validation accuracy " + (100 * config.val_accuracy).toFixed(1) + "%");
  parts.push(`${pre.size[1]}\u00d7${pre.size[0]} ${pre.channels === 1 ? "grey" : "colour"}`);
  parts.push("runs on this device (ONNX Runtime Web " + config.ort_web.version + ")");
  $("info").textContent = parts.join(" \u00b7 ");
  document.title = "cnnkit: " + config.title;
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) $("camera").hidden = false;
  document.body.dataset.state = "ready";
}

// Python's round(): halves go to the even neighbour (round(2.5) == 2), as cnnkit rounds.
function pyRound(x) {
  const r = Math.round(x);
  return Math.abs(x - Math.trunc(x)) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// uint8 (C, H, W) pixels of a picture (img, video or bitmap) of size sw x sh.
// 'stretch' (the built-in data sets): resize to the input size. 'shorter-side' (photos):
// resize the shorter side to size / crop_pct, keep the centre square, then take the
// input-size crop from its centre. Transparency is composited on white; grey is ITU-R 601
// luma with Pillow's integer rounding, so a grey PNG keeps its exact values.
function prepare(source, sw, sh) {
  const pre = config.preprocessing;
  const [h, w] = pre.size, c = pre.channels;
  let dx = 0, dy = 0, dw = w, dh = h;
  if (pre.resize === "shorter-side") {
    const stored = pyRound(h / (pre.crop_pct || 1));
    const scale = stored / Math.min(sw, sh);
    dw = Math.max(stored, pyRound(sw * scale));
    dh = Math.max(stored, pyRound(sh * scale));
    dx = -(Math.floor((dw - stored) / 2) + Math.floor((stored - w) / 2));
    dy = -(Math.floor((dh - stored) / 2) + Math.floor((stored - h) / 2));
  }
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
  ctx.imageSmoothingEnabled = true; ctx.imageSmoothingQuality = "high";
  ctx.drawImage(source, 0, 0, sw, sh, dx, dy, dw, dh);
  const rgba = ctx.getImageData(0, 0, w, h).data;
  const n = w * h, out = new Uint8Array(c * n);
  for (let i = 0; i < n; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    if (c === 1) out[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
    else { out[i] = r; out[n + i] = g; out[2 * n + i] = b; }
  }
  return out;
}

function classify(source, sw, sh) {
  const pixels = prepare(source, sw, sh);
  const pre = config.preprocessing;
  const shape = [1, pre.channels, pre.size[0], pre.size[1]];
  const run = queue.then(async () => {
    const t0 = performance.now();
    const input = new ort.Tensor("uint8", pixels, shape);
    const outputs = await session.run({ [session.inputNames[0]]: input });
    const score = outputs.ood_score ? outputs.ood_score.data[0] : null;
    return { probs: outputs[session.outputNames[0]].data, score, ms: performance.now() - t0 };
  });
  queue = run.catch(() => {});
  return run;
}

// The export's "unknown" rule: an out-of-distribution score below its threshold (the
// energy from the model's ood_score output, or the top probability) means "none of these".
function unknownNote(probs, score) {
  const rule = config.rejection;
  if (!rule) return null;
  const value = rule.output === "ood_score" ? score : Math.max(...probs);
  if (value === null || value >= rule.threshold) return null;
  return `Unlike the images this model was trained on (${rule.score} score ` +
    `${value.toFixed(2)}, threshold ${rule.threshold.toFixed(2)}). Its best guesses:`;
}

// Several labels per image: every label at or over its own threshold, most probable first.
function labelSet(probs) {
  const t = config.multilabel.thresholds;
  const over = Array.from(probs.keys()).filter(i => probs[i] >= t[i]);
  over.sort((a, b) => probs[b] - probs[a]);
  return over.map(i => config.classes[i]).join(" + ") || "no label";
}

function show(probs, ms, score) {
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]).slice(0, TOP_K);
  const note = unknownNote(probs, score);
  if (config.multilabel) $("label").textContent = labelSet(probs);
  else $("label").textContent = note ? "unknown" : config.classes[order[0]];
  $("unknown").textContent = note || ""; $("unknown").hidden = !note;
  $("bars").innerHTML = "";
  for (const i of order) {
    const row = document.createElement("div"); row.className = "bar";
    const name = document.createElement("span"); name.className = "name";
    name.textContent = config.classes[i];
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill";
    fill.style.width = (100 * probs[i]).toFixed(1) + "%";
    track.appendChild(fill);
    const pct = document.createElement("span"); pct.className = "pct";
    pct.textContent = (100 * probs[i]).toFixed(1) + "%";
    row.append(name, track, pct);
    $("bars").appendChild(row);
  }
  $("timing").textContent = `${ms.toFixed(1)} ms on this device`;
}

async function showFile(file) {
  if (!file) return;
  if (!session) { fail("the model is still loading"); return; }
  stopCamera();
  const mine = ++current;
  delete $("label").dataset.file;  // which file the shown result is of (tests wait on it)
  $("error").textContent = ""; $("view").hidden = false; $("label").textContent = "\u2026";
  $("bars").innerHTML = ""; $("timing").textContent = "";
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file); img.hidden = false;
  try {
    await img.decode();  // EXIF orientation is applied, as cnnkit does
    // small images (digits) shown as their pixels, photos smoothly
    img.style.imageRendering = img.naturalWidth < 224 ? "pixelated" : "auto";
  } catch (e) {
    if (mine === current) { img.hidden = true; fail(`${file.name}: not an image this browser can read`); }
    return;
  }
  try {
    const { probs, score, ms } = await classify(img, img.naturalWidth, img.naturalHeight);
    if (mine === current) { show(probs, ms, score); $("label").dataset.file = file.name; }
  } catch (e) {
    if (mine === current) fail("the model failed: " + e.message);
  }
}

async function startCamera() {
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  } catch (e) { fail("no camera: " + e.message); return; }
  const video = $("video"), mine = ++current;
  delete $("label").dataset.file;
  video.srcObject = stream; video.hidden = false; $("preview").hidden = true;
  $("view").hidden = false; $("error").textContent = ""; $("camera").textContent = "Stop camera";
  await video.play();
  while (stream && mine === current) {  // classify frame after frame, one at a time
    if (video.videoWidth) {
      try {
        const { probs, score, ms } = await classify(video, video.videoWidth, video.videoHeight);
        if (stream && mine === current) show(probs, ms, score);
      } catch (e) { fail("the model failed: " + e.message); break; }
    }
    await new Promise((r) => requestAnimationFrame(r));
  }
}

function stopCamera() {
  if (!stream) return;
  for (const track of stream.getTracks()) track.stop();
  stream = null; $("video").hidden = true; $("video").srcObject = null;
  $("camera").textContent = "Live camera";
}

$("file").onchange = (e) => { showFile(e.target.files[0]); e.target.value = ""; };
$("shoot").onchange = (e) => { showFile(e.target.files[0]); e.target.value = ""; };
$("camera").onclick = () => (stream ? stopCamera() : startCamera());
$("drop").ondragover = (e) => { e.preventDefault(); $("drop").classList.add("over"); };
$("drop").ondragleave = () => $("drop").classList.remove("over");
$("drop").ondrop = (e) => {
  e.preventDefault(); $("drop").classList.remove("over");
  if (e.dataTransfer.files[0]) showFile(e.dataTransfer.files[0]);
};
document.onpaste = (e) => {
  for (const item of e.clipboardData.items)
    if (item.type.startsWith("image/")) { showFile(item.getAsFile()); break; }
};

load().catch((e) => {
  document.body.dataset.state = "failed";
  $("info").textContent = "";
  fail("could not load the model: " + (e && e.message ? e.message : e));
});
