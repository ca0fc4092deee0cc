// text3dsam view: the scan in NiiVue, prompts -> POST /api/segment -> label overlay + legend.
// Talks to this server only (see the Content-Security-Policy the server sends).
import { Niivue, NVImage, SHOW_RENDER } from "/static/niivue/niivue.js";

// Distinct colours, handed out in order and kept by a prompt while it exists.
const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
  [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180],
];

const $ = (sel) => document.querySelector(sel);
const state = { prompts: [], rows: new Map(), overlay: null, busy: false, again: false, revision: 0, modality: null };
const nv = new Niivue({
  backColor: [0, 0, 0, 1],
  show3Dcrosshair: true,
  crosshairColor: [0.3, 0.75, 1, 0.8],
  multiplanarShowRender: SHOW_RENDER.ALWAYS,
  isColorbar: false,
  logLevel: "warn",
});
window.text3dsamView = { nv, state };

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function colourFor() {
  const used = new Set(state.prompts.map((p) => p.colour.join()));
  return PALETTE.find((c) => !used.has(c.join())) || PALETTE[state.prompts.length % PALETTE.length];
}

function setWindow(level, width) {
  const image = nv.volumes[0];
  if (!image) return;
  image.cal_min = level - width / 2;
  image.cal_max = level + width / 2;
  nv.updateGLVolume();
}

function setupWindows(presets) {
  const select = $("#window");
  const names = Object.keys(presets);
  if (!names.length) {
    $("#window-box").hidden = true;
    return;
  }
  for (const name of names) {
    const { level, width } = presets[name];
    select.add(new Option(`${name} (L ${level} / W ${width})`, name));
  }
  select.addEventListener("change", () => setWindow(presets[select.value].level, presets[select.value].width));
  setWindow(presets[names[0]].level, presets[names[0]].width);
}

function setupViews() {
  const types = { axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal, sagittal: nv.sliceTypeSagittal,
    render: nv.sliceTypeRender, multi: nv.sliceTypeMultiplanar };
  for (const button of document.querySelectorAll("[data-view]")) {
    button.addEventListener("click", () => {
      nv.setSliceType(types[button.dataset.view]);
      for (const b of document.querySelectorAll("[data-view]")) b.classList.toggle("active", b === button);
    });
  }
}

function renderLegend(labels) {
  const byPrompt = new Map(labels.map((row) => [row.prompt, row]));
  const body = $("#legend tbody");
  body.replaceChildren();
  for (const prompt of state.prompts) {
    const row = byPrompt.get(prompt.text);
    const tr = document.createElement("tr");
    tr.className = prompt.on ? "on" : "off";
    tr.dataset.prompt = prompt.text;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${prompt.colour.join(",")})`;
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.checked = prompt.on;
    toggle.title = "show / hide";
    toggle.addEventListener("change", () => { prompt.on = toggle.checked; refresh(); });
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.title = "remove";
    remove.addEventListener("click", () => {
      state.prompts = state.prompts.filter((p) => p !== prompt);
      refresh();
    });
    const cells = [
      [toggle, swatch], [prompt.text],
      [row ? row.volume_ml.toFixed(1) : "–"], [row ? String(row.components) : "–"], [remove],
    ];
    cells.forEach((content, i) => {
      const td = document.createElement("td");
      if (i === 1) td.className = "prompt";
      if (i === 2 || i === 3) td.className = "num";
      td.append(...content);
      tr.append(td);
    });
    body.append(tr);
  }
  $("#empty-legend").hidden = state.prompts.length > 0;
  const any = labels.length > 0;
  for (const id of ["#dl-labels", "#dl-sidecar"]) $(id).classList.toggle("disabled", !any);
}

async function showOverlay(labels) {
  if (state.overlay) {
    nv.removeVolume(state.overlay);
    state.overlay = null;
  }
  if (labels.length) {
    const colours = new Map(state.prompts.map((p) => [p.text, p.colour]));
    const lut = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [""] };
    for (const row of labels) {
      const [r, g, b] = colours.get(row.prompt) || [255, 255, 255];
      lut.R.push(r); lut.G.push(g); lut.B.push(b); lut.A.push(255); lut.I.push(row.label);
      lut.labels.push(row.prompt);
    }
    const overlay = await NVImage.loadFromUrl({ url: `/api/labels.nii.gz?revision=${state.revision}`,
      name: "labels.nii.gz", opacity: Number($("#opacity").value) });
    overlay.setColormapLabel(lut);
    nv.addVolume(overlay);
    state.overlay = overlay;
  }
  nv.updateGLVolume();
}

// One request at a time; changes made meanwhile are sent as soon as it returns.
async function refresh() {
  if (state.busy) {
    state.again = true;
    return;
  }
  state.busy = true;
  try {
    do {
      state.again = false;
      const active = state.prompts.filter((p) => p.on).map((p) => p.text);
      setStatus(active.length ? `segmenting ${active.length} prompt(s)…` : "no prompts");
      const answer = await api("/api/segment", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ prompts: active }),
      });
      state.revision += 1;
      renderLegend(answer.labels);
      await showOverlay(answer.labels);
      const t = answer.timings;
      $("#timing").textContent = `last request ${(t.total || 0).toFixed(2)} s` +
        (t.encode ? ` (image encoding ${t.encode.toFixed(2)} s, once)` : "");
      setStatus("ready");
      document.body.dataset.revision = String(state.revision);
    } while (state.again);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    state.busy = false;
  }
}

function setupPrompt() {
  const input = $("#prompt");
  $("#prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const existing = state.prompts.find((p) => p.text === text);
    if (existing) existing.on = true;
    else state.prompts.push({ text, colour: colourFor(), on: true });
    renderLegend([]);
    refresh();
  });
  let timer = null;
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => suggest(input.value.trim()), 150);
  });
  suggest("");
}

async function suggest(query) {
  const params = new URLSearchParams({ q: query, limit: "30" });
  if (state.modality) params.set("modality", state.modality);
  try {
    const { suggestions } = await api(`/api/vocabulary?${params}`);
    const list = $("#suggestions");
    list.replaceChildren(...suggestions.map((s) => new Option(s.name)));
  } catch (error) {
    console.warn("no suggestions:", error.message);
  }
}

async function main() {
  setupViews();
  $("#opacity").addEventListener("input", (event) => {
    if (state.overlay) nv.setOpacity(nv.volumes.indexOf(state.overlay), Number(event.target.value));
  });
  await nv.attachToCanvas($("#gl"));
  const info = await api("/api/info");
  $("#scan-name").textContent = `${info.input} · ${info.modality.modality || "unknown modality"} · ` +
    `${info.geometry.shape_zyx.slice().reverse().join("×")} voxels`;
  state.modality = info.modality.modality;
  setStatus("loading the scan…");
  await nv.loadVolumes([{ url: "/api/image.nii.gz", name: "image.nii.gz", colormap: "gray" }]);
  setupWindows(info.window_presets);
  nv.setSliceType(nv.sliceTypeMultiplanar);
  setupPrompt();
  renderLegend([]);
  setStatus("ready");
  document.body.dataset.ready = "1";
}

main().catch((error) => setStatus(`could not start: ${error.message}`, true));
