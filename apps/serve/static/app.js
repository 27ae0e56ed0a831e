// The page over `dlpipe serve --ui`: list the models (GET v1/models), post to the task endpoint
// (POST v1/models/{name}/predict) and draw each task's answer. Plain DOM and fetch, no build step; every
// text from the server goes in through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const state = { models: [], palette: [[0, 0, 0]], files: [], previews: [], cardFor: null };

// ---- small DOM helpers --------------------------------------------------------------------------------------

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function rgb(colour) {
  return `rgb(${colour[0]}, ${colour[1]}, ${colour[2]})`;
}

function pngSource(base64) {
  return `data:image/png;base64,${base64}`;
}

function picture(src, alt) {
  return el("img", { src, alt, className: "picture" });
}

function figure(src, alt, caption) {
  return el("figure", {}, [picture(src, alt), el("figcaption", { text: caption })]);
}

// A list of labelled bars: items are {label, value, fraction (0..1), text, chosen}.
function bars(items, name) {
  const list = el("ol", { className: "bars", "aria-label": name });
  for (const item of items) {
    const fill = el("span", { className: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, item.fraction)) * 100}%`;
    const row = el("li", { className: item.chosen ? "chosen" : "" }, [
      el("span", { className: "label", text: item.label }),
      el("span", { className: "bar", "aria-hidden": "true" }, [fill]),
      el("span", { className: "score", text: item.text }),
    ]);
    row.dataset.value = String(item.value);
    list.append(row);
  }
  return list;
}

// ---- what each task asks for and how its answer is drawn --------------------------------------------------
// options: inputs turned into query parameters; params: fixed query parameters; render(row, context) -> nodes.

const TASKS = {
  classification: {
    options: [{ name: "top_k", label: "Top labels", type: "number", value: 5, min: 1, max: 1000 }],
    render(row) {
      const items = row.top_k.map((t, i) => ({
        label: t.label, value: t.score, fraction: t.score, text: t.score.toFixed(3), chosen: i === 0,
      }));
      return [el("p", { className: "verdict" }, [
        el("span", { className: "top-label", text: row.label }), " ",
        el("span", { className: "top-score", text: row.score.toFixed(3) }),
      ]), bars(items, `Top labels of ${row.image}`)];
    },
  },
  segmentation: {
    params: { overlay: "true" },
    render(row) {
      const legend = el("ul", { className: "legend", "aria-label": `Classes in ${row.image}` });
      const shares = Object.entries(row.shares);
      shares.forEach(([label, share], index) => {
        if (share <= 0) return;
        const colour = rgb(state.palette[index % state.palette.length]);
        const swatch = el("span", { className: "swatch", "aria-hidden": "true" });
        const fill = el("span", { className: "fill" });
        swatch.style.backgroundColor = colour;
        fill.style.backgroundColor = colour;
        fill.style.width = `${100 * share}%`;
        const item = el("li", {}, [swatch, el("span", { className: "label", text: label }),
          el("span", { className: "bar", "aria-hidden": "true" }, [fill]),
          el("span", { className: "score", text: share < 0.001 ? "<0.1%" : `${(100 * share).toFixed(1)}%` })]);
        item.dataset.value = String(share);
        legend.append(item);
      });
      const absent = shares.filter(([, share]) => share <= 0).length;
      return [figure(pngSource(row.overlay_png), `Segmentation overlay of ${row.image}`, "Classes over the image"),
        legend, el("p", { className: "hint", text: absent ? `${absent} classes not found.` : "" })];
    },
  },
  detection: {
    options: [{ name: "threshold", label: "Score threshold", type: "number", value: 0.5, min: 0, max: 1, step: 0.05 }],
    render(row, context) {
      const found = row.detections;
      const summary = found.map((d) => `${d.label} ${d.score.toFixed(2)}`).join(", ");
      const canvas = detectionCanvas(row, found, context.preview,
        `${found.length} objects found in ${row.image}${summary ? `: ${summary}` : ""}`);
      const table = el("table", {}, [el("caption", { text: `${found.length} objects (score at least ${row.threshold})` }),
        el("thead", {}, [el("tr", {}, ["Label", "Score", "Box (x0, y0, x1, y1)"].map((h) => el("th", { scope: "col", text: h })))])]);
      const body = el("tbody");
      for (const d of found) {
        // as the server rounded them (scores to 4 decimals, boxes to 2): no second rounding
        body.append(el("tr", {}, [el("td", { text: d.label }), el("td", { text: String(d.score) }),
          el("td", { text: d.box.join(", ") })]));
      }
      table.append(body);
      return [canvas, el("div", { className: "table-scroll" }, [table])];
    },
  },
  captioning: {
    options: [{ name: "beam", label: "Beam width", type: "number", value: "", min: 1, max: 64 }],
    render(row) {
      return [el("p", { className: "caption", text: row.caption }),
        el("p", { className: "hint", text: `score ${row.score.toFixed(3)}, beam ${row.beam}` })];
    },
  },
  stylization: {
    options: [{ name: "size", label: "Longest side (0: as uploaded)", type: "number", value: "", min: 0, max: 4096 }],
    render(row, context) {
      return [pair(context, pngSource(row.stylized_png), `Stylized ${row.image}`, "Stylized")];
    },
  },
  reconstruction: {
    render(row, context) {
      return [pair(context, pngSource(row.reconstruction_png), `Reconstruction of ${row.image}`, "Reconstruction")];
    },
  },
  generation: {
    options: [
      { name: "n", label: "Images", type: "number", value: 16, min: 1, max: 256 },
      { name: "seed", label: "Seed", type: "number", value: 0, min: 0 },
      { name: "class", label: "Class", type: "text", value: "", list: true, conditional: true },
      { name: "columns", label: "Columns", type: "number", value: 8, min: 1, max: 256 },
    ],
    render(row) {
      const what = `${row.n} generated images, seed ${row.seed}${row.class ? `, class ${row.class}` : ""}`;
      return [figure(pngSource(row.grid_png), `Grid of ${what}`, what)];
    },
  },
  control: {
    render(row, context) {
      const names = context.model.labels;
      const low = Math.min(...row.q_values);
      const span = Math.max(...row.q_values) - low || 1;
      const items = row.q_values.map((q, i) => ({
        label: names[i] !== undefined ? names[i] : String(i), value: q, fraction: 0.05 + 0.95 * (q - low) / span,
        text: q.toFixed(3), chosen: i === row.action,
      }));
      return [el("p", { className: "verdict" }, ["Action ", el("span", { className: "top-label", text: row.action_name }),
        ` (${row.action})`]), bars(items, "Q-values")];
    },
  },
};

function pair(context, src, alt, caption) {
  const both = el("div", { className: "pair" });
  if (context.preview) both.append(figure(context.preview, `Input ${context.name}`, "Input"));
  both.append(figure(src, alt, caption));
  return both;
}

// Boxes with label and score over the image. The canvas holds the image at a few times its size when it is
// small, so that the labels stay sharp and about 12 CSS pixels high once the canvas is scaled to the page.
function detectionCanvas(row, found, source, label) {
  const scale = Math.max(1, Math.min(4, Math.floor(768 / Math.max(row.width, row.height))));
  const canvas = el("canvas", { className: "picture", width: row.width * scale, height: row.height * scale,
    role: "img", "aria-label": label });
  const context = canvas.getContext("2d");
  const draw = (image) => {
    const shown = canvas.clientWidth || Math.min(canvas.width, 384);
    const unit = canvas.width / shown;  // canvas pixels per CSS pixel
    const font = Math.round(12 * unit);
    context.imageSmoothingEnabled = scale === 1;
    if (image) context.drawImage(image, 0, 0, canvas.width, canvas.height);
    context.font = `${font}px sans-serif`;
    context.lineWidth = Math.max(1, Math.round(2 * unit));
    for (const d of found) {
      const colour = state.palette[1 + (d.index % (state.palette.length - 1))] || [230, 25, 75];
      const [x0, y0, x1, y1] = d.box.map((v) => v * scale);
      context.strokeStyle = rgb(colour);
      context.strokeRect(x0, y0, x1 - x0, y1 - y0);
      const text = `${d.label} ${d.score.toFixed(2)}`;
      const top = Math.max(0, y0 - font - 2);
      context.fillStyle = rgb(colour);
      context.fillRect(x0, top, context.measureText(text).width + 4, font + 2);
      context.fillStyle = colour[0] + colour[1] + colour[2] > 400 ? "#000" : "#fff";
      context.fillText(text, x0 + 2, top + font - 1);
    }
    canvas.dataset.drawn = String(found.length);
  };
  const image = new Image();
  image.onload = () => draw(image);
  image.onerror = () => draw(null);
  if (source) image.src = source;
  else requestAnimationFrame(() => draw(null));
  return canvas;
}

// ---- the form -------------------------------------------------------------------------------------------------

function selectedModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function showError(message) {
  const alert = $("alert");
  alert.textContent = message;
  alert.hidden = false;
}

function clearError() {
  $("alert").hidden = true;
  $("alert").textContent = "";
}

function describe(model) {
  if (!model) return "";
  const parts = [model.task ? `task ${model.task}` : "no dlpipe metadata: tensor API (/v2) only",
    `version ${model.version} of ${model.versions.join(", ")}`];
  if (model.input_size) parts.push(`input ${model.input_size[0]}x${model.input_size[1]} ${model.color}`);
  if (model.precision) parts.push(model.precision);
  if (model.label_count) {
    const more = model.label_count > model.labels.length ? ", …" : "";
    parts.push(`${model.label_count} labels: ${model.labels.join(", ")}${more}`);
  }
  return parts.join(" · ");
}

function buildOptions(model) {
  const spec = (TASKS[model.task] || {}).options || [];
  const box = $("options");
  box.replaceChildren();
  for (const option of spec) {
    if (option.conditional && !model.conditional) continue; // a class only for a class-conditional generator
    const id = `option-${option.name}`;
    const value = option.conditional && model.labels.length ? model.labels[0] : option.value;
    const input = el("input", { id, name: option.name, type: option.type, value });
    for (const key of ["min", "max", "step"]) if (option[key] !== undefined) input.setAttribute(key, option[key]);
    if (option.type === "number") input.setAttribute("inputmode", "decimal");
    const field = el("div", { className: "field" }, [el("label", { for: id, text: option.label }), input]);
    if (option.list && model.labels.length) {
      const list = el("datalist", { id: `${id}-list` }, model.labels.map((l) => el("option", { value: l })));
      input.setAttribute("list", list.id);
      field.append(list);
    }
    box.append(field);
  }
  $("task-options").hidden = spec.length === 0;
}

function observationExample(model) {
  const shape = model.inputs.length ? model.inputs[0].shape.slice(1) : [];
  const width = shape.length === 1 && shape[0] > 0 ? shape[0] : 4;
  return JSON.stringify([new Array(width).fill(0)]);
}

function chooseModel() {
  const model = selectedModel();
  clearError();
  $("results").replaceChildren();
  $("latency").textContent = "";
  $("model-info").textContent = describe(model);
  for (const box of document.querySelectorAll("fieldset.request")) {
    box.hidden = !model || box.dataset.request !== model.request;
  }
  if (model) buildOptions(model);
  if (model && model.request === "observations" && !$("observations").value) {
    $("observations").value = observationExample(model);
  }
  $("submit").disabled = !model || !model.request;
  $("submit").textContent = model && model.request === "none" ? "Generate" : "Predict";
  state.cardFor = null;
  if ($("card").open) loadCard();
}

function setFiles(files) {
  for (const url of state.previews) URL.revokeObjectURL(url);
  state.files = Array.from(files);
  state.previews = state.files.map((f) => URL.createObjectURL(f));
  $("previews").replaceChildren(...state.files.map((f, i) => el("li", {}, [
    el("img", { src: state.previews[i], alt: `Preview of ${f.name}` }),
    el("span", { className: "name", text: f.name }),
  ])));
}

function queryParameters(model) {
  const params = new URLSearchParams((TASKS[model.task] || {}).params || {});
  for (const input of $("options").querySelectorAll("input")) {
    if (input.value.trim() !== "") params.set(input.name, input.value.trim());
  }
  return params;
}

// The request's body and headers, or throws an Error with a message for the page.
function requestBody(model) {
  if (model.request === "images") {
    if (!state.files.length) throw new Error("Choose at least one image file first.");
    const form = new FormData();
    for (const file of state.files) form.append("files", file, file.name);
    return { body: form };
  }
  if (model.request === "observations") {
    let value;
    try {
      value = JSON.parse($("observations").value);
    } catch (error) {
      throw new Error(`The observations are not JSON: ${error.message}`);
    }
    const many = Array.isArray(value) && value.length > 0 && Array.isArray(value[0]);
    const payload = Array.isArray(value) ? { [many ? "observations" : "observation"]: value } : value;
    return { body: JSON.stringify(payload), headers: { "content-type": "application/json" } };
  }
  return {};
}

function serverTime(response) {
  const header = response.headers.get("server-timing") || "";
  const match = /dur=([0-9.]+)/.exec(header);
  return match ? Number(match[1]) : null;
}

async function readAnswer(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { error: text.trim() || `HTTP ${response.status} ${response.statusText}` };
  }
}

function render(model, answer) {
  const task = TASKS[model.task];
  const results = $("results");
  results.replaceChildren();
  answer.results.forEach((row, i) => {
    const name = row.image || (model.request === "observations" ? `Observation ${i + 1}` : model.name);
    const article = el("article", { className: "result" }, [el("h2", { text: name })]);
    if (row.error) {
      article.append(el("p", { className: "row-error", text: row.error }));
    } else if (task) {
      article.append(...task.render(row, { model, name, preview: state.previews[i] }));
    } else {
      article.append(el("pre", { text: JSON.stringify(row, null, 2) }));
    }
    results.append(article);
  });
}

async function predict(event) {
  event.preventDefault();
  const model = selectedModel();
  if (!model) return;
  clearError();
  let request;
  try {
    request = requestBody(model);
  } catch (error) {
    showError(error.message);
    return;
  }
  const button = $("submit");
  button.disabled = true;
  $("results").setAttribute("aria-busy", "true");
  $("latency").textContent = "Waiting for the server…";
  const url = `v1/models/${encodeURIComponent(model.name)}/predict?${queryParameters(model)}`;
  try {
    const started = performance.now();
    const response = await fetch(url, { method: "POST", ...request });
    const answer = await readAnswer(response);
    const elapsed = performance.now() - started;
    const server = serverTime(response);
    $("latency").textContent = `Round trip ${elapsed.toFixed(1)} ms` +
      (server !== null ? ` · server ${server.toFixed(1)} ms` : "");
    if (!response.ok || answer.error) {
      $("results").replaceChildren();
      showError(answer.error || `HTTP ${response.status}`);
    } else {
      render(model, answer);
    }
  } catch (error) {
    $("latency").textContent = "";
    showError(`The request failed: ${error.message}`);
  } finally {
    button.disabled = false;
    $("results").removeAttribute("aria-busy");
  }
}

async function loadCard() {
  const model = selectedModel();
  if (!model || state.cardFor === model.name) return;
  state.cardFor = model.name;
  $("card-status").textContent = "Loading…";
  $("card-text").textContent = "";
  try {
    const response = await fetch(`v1/models/${encodeURIComponent(model.name)}/card`);
    if (response.ok) {
      $("card-text").textContent = await response.text();
      $("card-status").textContent = "";
    } else {
      $("card-status").textContent = (await readAnswer(response)).error;
    }
  } catch (error) {
    $("card-status").textContent = `The card could not be loaded: ${error.message}`;
  }
}

async function loadModels() {
  try {
    const response = await fetch("v1/models");
    const answer = await readAnswer(response);
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    state.models = answer.models;
    state.palette = answer.palette;
  } catch (error) {
    $("model").replaceChildren(el("option", { value: "", text: "No models" }));
    showError(`The model list could not be loaded: ${error.message}`);
    return;
  }
  const options = state.models.map((m) => {
    const option = el("option", { value: m.name, text: `${m.name} (${m.task || "tensor API only"})` });
    if (!m.request) option.disabled = true;
    return option;
  });
  $("model").replaceChildren(...options);
  const first = state.models.find((m) => m.request);
  if (first) $("model").value = first.name;
  else showError("No served model has a task endpoint; use the tensor API under /v2.");
  chooseModel();
  document.body.dataset.ready = "true";
}

function wireDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) {
      $("files").files = event.dataTransfer.files;
      setFiles(event.dataTransfer.files);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", chooseModel);
  $("files").addEventListener("change", () => setFiles($("files").files));
  $("predict-form").addEventListener("submit", predict);
  $("card").addEventListener("toggle", () => { if ($("card").open) loadCard(); });
  wireDropZone();
  loadModels();
});
