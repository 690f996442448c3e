// The try-it page: a client of the public API like any other (GET models, POST translate/{direction}).
// URLs are relative, so the page keeps working behind a proxy that serves the API under a path prefix.
"use strict";

const KEY_STORAGE = "dclgan-serve.api-key";
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

const byId = (id) => document.getElementById(id);
const ui = {
  form: byId("translate-form"),
  direction: byId("direction"),
  format: byId("format"),
  apiKey: byId("api-key"),
  dropZone: byId("drop-zone"),
  dropText: byId("drop-text"),
  file: byId("file"),
  limits: byId("limits"),
  button: byId("translate"),
  status: byId("status"),
  error: byId("error"),
  results: byId("results"),
  inputFigure: byId("input-figure"),
  inputImage: byId("input-image"),
  inputSize: byId("input-size"),
  outputFigure: byId("output-figure"),
  outputImage: byId("output-image"),
  outputSize: byId("output-size"),
  download: byId("download"),
};

let chosen = null; // the File to translate
let busy = false;
// Bumped by every new choice or request: a response that arrives after either is stale and dropped,
// so the output shown always belongs to the input shown.
let generation = 0;
const objectUrls = { input: null, output: null };

function showObject(slot, blob) {
  if (objectUrls[slot]) URL.revokeObjectURL(objectUrls[slot]);
  objectUrls[slot] = URL.createObjectURL(blob);
  return objectUrls[slot];
}

function setError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function updateButton() {
  ui.button.disabled = busy || !chosen || !ui.direction.value;
}

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// "image_too_large" -> "Image too large"
function humanize(code) {
  const words = code.replaceAll("_", " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

// Every API error is JSON {"error": code, "detail": message}; for validation errors detail is a list.
async function describeError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON: a proxy in front of the service answered, say so by status.
  }
  if (!body || typeof body.error !== "string") {
    return `The server answered ${response.status} ${response.statusText}`.trim() + ".";
  }
  const detail = Array.isArray(body.detail)
    ? body.detail.map((item) => item.msg ?? JSON.stringify(item)).join("; ")
    : body.detail;
  let text = detail ? `${humanize(body.error)}: ${detail}` : humanize(body.error);
  const retryAfter = response.headers.get("Retry-After");
  if (retryAfter) text += ` (try again in ${retryAfter} s)`;
  if (response.status === 401) text += ". Enter a valid API key above.";
  return text;
}

function fillDirections(entries) {
  const previous = ui.direction.value;
  ui.direction.replaceChildren(
    ...entries.map(({ value, label }) => new Option(label, value, false, value === previous)),
  );
  if (!entries.length) ui.direction.append(new Option("No direction available", ""));
  ui.direction.disabled = !entries.length;
  updateButton();
}

async function loadModels() {
  setError("");
  let response;
  try {
    response = await fetch("models", { headers: authHeaders() });
  } catch (err) {
    fillDirections([]);
    setError(`Cannot reach the service (${err.message}).`);
    return;
  }
  if (!response.ok) {
    fillDirections([]);
    setError(`Cannot list the models. ${await describeError(response)}`);
    return;
  }
  const catalog = await response.json();
  // The server works at the model's recommended side when it has one, capped by the server's max_side.
  workingSides = new Map(
    catalog.models.flatMap((model) =>
      model.directions.map((d) => [d.name, Math.min(model.working_side ?? catalog.max_side, catalog.max_side)]),
    ),
  );
  fillDirections(
    catalog.models.flatMap((model) =>
      model.directions.map((d) => ({
        value: d.name,
        label: `${d.name}: ${d.source} → ${d.target} (${model.name} v${model.version})`,
      })),
    ),
  );
  describeLimits();
}

let workingSides = new Map();

function describeLimits() {
  const side = workingSides.get(ui.direction.value);
  ui.limits.textContent = side
    ? `Images with a side over ${side} px are translated at ${side} px and scaled back to their own size.`
    : "";
}

function choose(file) {
  if (!file) return;
  chosen = file;
  generation += 1;
  setError("");
  ui.status.textContent = "";
  ui.dropText.textContent = `${file.name} (${Math.ceil(file.size / 1024)} KiB). Drop or choose another to replace it.`;
  ui.outputFigure.hidden = true;
  ui.inputImage.hidden = false;
  ui.inputSize.textContent = "";
  ui.inputImage.alt = `Input: ${file.name}`;
  ui.inputImage.src = showObject("input", file);
  ui.inputFigure.hidden = false;
  updateButton();
}

ui.inputImage.addEventListener("load", () => {
  ui.inputSize.textContent = `${ui.inputImage.naturalWidth}×${ui.inputImage.naturalHeight}`;
});
ui.inputImage.addEventListener("error", () => {
  // Not fatal: the service decodes more formats than some browsers (TIFF), and it will report bad files.
  ui.inputImage.hidden = true;
  ui.inputSize.textContent = "(this browser cannot preview the file)";
});

async function showOutput(blob, source, direction) {
  const url = showObject("output", blob);
  ui.outputImage.alt = `${source.name} translated ${direction}`;
  ui.outputImage.src = url;
  // Wait until decoded, so the size is known and "done" is only said once there is a picture.
  await ui.outputImage.decode();
  ui.outputSize.textContent = `${ui.outputImage.naturalWidth}×${ui.outputImage.naturalHeight}`;
  const stem = source.name.replace(/\.[^.]*$/, "") || "image";
  ui.download.href = url;
  ui.download.download = `${stem}-${direction}.${EXTENSIONS[blob.type] ?? ui.format.value}`;
  ui.outputFigure.hidden = false;
}

function setBusy(value) {
  busy = value;
  ui.results.setAttribute("aria-busy", String(value));
  updateButton();
}

async function translate(event) {
  event.preventDefault();
  if (busy || !chosen || !ui.direction.value) return;
  const source = chosen;
  const direction = ui.direction.value;
  const ticket = ++generation;
  const body = new FormData();
  body.append("image", source, source.name);

  setError("");
  setBusy(true);
  ui.status.textContent = `Translating ${source.name} with ${direction}…`;
  const started = performance.now();
  try {
    let response;
    try {
      const url = `translate/${encodeURIComponent(direction)}?format=${encodeURIComponent(ui.format.value)}`;
      response = await fetch(url, { method: "POST", headers: authHeaders(), body });
    } catch (err) {
      throw new Error(`Cannot reach the service (${err.message}).`);
    }
    const result = response.ok ? await response.blob() : await describeError(response);
    if (ticket !== generation) return;
    if (!response.ok) throw new Error(result);
    try {
      await showOutput(result, source, direction);
    } catch {
      throw new Error("The browser cannot display the result; try another output format.");
    }
    const version = response.headers.get("X-Model-Version");
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    ui.status.textContent = `Done in ${seconds} s` + (version ? ` (model version ${version}).` : ".");
  } catch (err) {
    ui.status.textContent = "";
    setError(err.message);
  } finally {
    setBusy(false);
  }
}

// Drops anywhere on the page count: a file dropped beside the zone would otherwise make the browser
// navigate away to it.
let dragDepth = 0;
document.addEventListener("dragenter", (event) => {
  event.preventDefault();
  dragDepth += 1;
  ui.dropZone.classList.add("dragging");
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) ui.dropZone.classList.remove("dragging");
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  ui.dropZone.classList.remove("dragging");
  choose(event.dataTransfer.files[0]);
});

ui.file.addEventListener("change", () => choose(ui.file.files[0]));
ui.direction.addEventListener("change", () => {
  updateButton();
  describeLimits();
});
ui.form.addEventListener("submit", translate);
ui.apiKey.addEventListener("change", () => {
  const key = ui.apiKey.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  loadModels();
});

ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
loadModels();
