// The student server's page: sends dropped tiles and slides to the server's API and shows the results.
// Plain browser JavaScript with no build step and no outside resources. Every text the server sends is
// written with textContent, never parsed as HTML.
// map.js, loaded before this script, draws the map of a slide job.
"use strict";

const API_KEY_STORAGE = "unite-student-api-key";
const TILE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".tif", ".tiff"];
// The server's default of page_tiff_slide_min_bytes, used only when <body> lacks a valid data-tiff-slide-min-bytes.
const DEFAULT_TIFF_SLIDE_MIN_BYTES = 8 * 1024 * 1024;
const POLL_INTERVAL_MS = 500;
const SLOW_POLL_INTERVAL_MS = 2000;
const MAX_POLL_FAILURES = 10;
// A job id as the server makes it (uuid4().hex): 32 lowercase hex digits. Anything else names no job.
const JOB_ID_PATTERN = /^[0-9a-f]{32}$/;
const JOB_STATUSES = ["queued", "running", "succeeded", "failed", "interrupted"];
const SVG_NS = "http://www.w3.org/2000/svg";

let cardCount = 0;
// A TIFF file of at least this many bytes is sent as a slide, a smaller one as a tile. Set at start-up.
let tiffSlideMinBytes = DEFAULT_TIFF_SLIDE_MIN_BYTES;

// API calls

// An error of an API call, with the HTTP status (0 when the server could not be reached).
class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return sessionStorage.getItem(API_KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

// Return the message of the API's error shape {"error": {"code", "message", ...}}, or the HTTP status.
function errorMessageOf(status, statusText, bodyText) {
  try {
    const body = JSON.parse(bodyText);
    if (body && body.error && body.error.message) {
      return body.error.message;
    }
  } catch (parseError) {
    // Not JSON, for instance a proxy's HTML page: the HTTP status below is all there is.
  }
  return `the server returned HTTP ${status}${statusText ? " " + statusText : ""}.`;
}

async function apiFetch(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (networkError) {
    throw new ApiError(`could not reach the server for ${path}: ${networkError.message}`);
  }
  if (!response.ok) {
    throw new ApiError(errorMessageOf(response.status, response.statusText, await response.text()), response.status);
  }
  return response;
}

async function apiJson(path, options) {
  return (await apiFetch(path, options)).json();
}

// Return an object URL of an image or file the API serves, fetched with the API key.
async function apiBlobUrl(path) {
  const blob = await (await apiFetch(path)).blob();
  return URL.createObjectURL(blob);
}

// POST a FormData with XMLHttpRequest, because fetch reports no upload progress.
function postWithProgress(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) {
      request.setRequestHeader(name, value);
    }
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) {
        onProgress(event.loaded / event.total);
      }
    });
    request.addEventListener("load", () => {
      if (request.status >= 200 && request.status < 300) {
        resolve(JSON.parse(request.responseText));
      } else {
        reject(new ApiError(errorMessageOf(request.status, request.statusText, request.responseText), request.status));
      }
    });
    request.addEventListener("error", () => reject(new ApiError(`could not reach the server for ${path}.`)));
    request.send(formData);
  });
}

// Page state and small helpers

function $(selector, root = document) {
  return root.querySelector(selector);
}

function showError(element, message) {
  element.textContent = message;
  element.hidden = false;
}

function optionValue(id) {
  return document.getElementById(id).value.trim();
}

function shortHash(sha256) {
  return sha256 ? sha256.slice(0, 12) : "unknown";
}

function addSummaryRow(list, term, value, title) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  if (title) {
    dd.title = title;
  }
  list.append(dt, dd);
}

function newCard(templateId, title) {
  const card = document.getElementById(templateId).content.firstElementChild.cloneNode(true);
  cardCount += 1;
  card.id = `card-${cardCount}`;
  $(".card-title", card).textContent = title;
  $("#no-results").hidden = true;
  $("#results").prepend(card);
  return card;
}

function fileExtension(name) {
  const dot = name.lastIndexOf(".");
  return dot < 0 ? "" : name.slice(dot).toLowerCase();
}

// Decide whether a file is a tile or a slide: the "Send files as" option, else its extension and size.
function isTile(file) {
  const sendAs = optionValue("send-as");
  if (sendAs !== "auto") {
    return sendAs === "tile";
  }
  const extension = fileExtension(file.name);
  if (!TILE_EXTENSIONS.includes(extension)) {
    return false;
  }
  const isTiff = extension === ".tif" || extension === ".tiff";
  return !isTiff || file.size < tiffSlideMinBytes;
}

function handleFiles(fileList) {
  const files = Array.from(fileList);
  const tiles = files.filter(isTile);
  const slides = files.filter((file) => !isTile(file));
  // One request per tile, so each card shows its own tile's embedding or error.
  for (const tile of tiles) {
    embedTile(tile);
  }
  for (const slide of slides) {
    embedSlide(slide);
  }
}

// Tiles

async function embedTile(file) {
  const card = newCard("tile-template", `Tile ${file.name}`);
  const form = new FormData();
  form.append("file", file);
  if (optionValue("embedding-space") === "teacher-space") {
    form.append("model", "teacher-space");
  }
  if (optionValue("mpp")) {
    form.append("mpp", optionValue("mpp"));
  }
  card.dataset.status = "embedding";

  let response;
  try {
    response = await apiJson("/v1/embeddings/upload", { method: "POST", body: form });
  } catch (error) {
    card.dataset.status = "failed";
    showError($(".error", card), error.message);
    return;
  }
  showTileEmbedding(card, response.data[0].embedding, response);
}

function showTileEmbedding(card, embedding, response) {
  const summary = $(".summary", card);
  const sha256 = response.checkpoint_sha256 || (response.usage && response.usage.checkpoint_sha256);
  addSummaryRow(summary, "Dimension", String(embedding.length));
  addSummaryRow(summary, "Model", response.model);
  addSummaryRow(summary, "Checkpoint sha256", shortHash(sha256), sha256);
  addStatisticsRows(summary, embedding);
  drawSparkline($(".sparkline", card), embedding);
  $(".sparkline-figure", card).hidden = false;
  card.dataset.status = "done";
}

// Format with 4 decimals, writing a value that rounds to zero as "0.0000" rather than "-0.0000".
function formatNumber(value) {
  const text = value.toFixed(4);
  return Number(text) === 0 ? (0).toFixed(4) : text;
}

function addStatisticsRows(summary, values) {
  let squares = 0;
  let sum = 0;
  for (const value of values) {
    squares += value * value;
    sum += value;
  }
  addSummaryRow(summary, "L2 norm", formatNumber(Math.sqrt(squares)));
  addSummaryRow(summary, "Mean", formatNumber(sum / values.length));
  addSummaryRow(summary, "Min / max", `${formatNumber(Math.min(...values))} / ${formatNumber(Math.max(...values))}`);
}

function drawSparkline(svg, values) {
  const width = 384;
  const height = 60;
  const low = Math.min(...values);
  const high = Math.max(...values);
  const span = high - low || 1;
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  const points = values.map((value, index) => `${(index * step).toFixed(2)},${(height - ((value - low) / span) * height).toFixed(2)}`);

  const zero = document.createElementNS(SVG_NS, "line");
  const zeroY = height - ((0 - low) / span) * height;
  zero.setAttribute("class", "sparkline-zero");
  zero.setAttribute("x1", "0");
  zero.setAttribute("x2", String(width));
  zero.setAttribute("y1", zeroY.toFixed(2));
  zero.setAttribute("y2", zeroY.toFixed(2));

  const line = document.createElementNS(SVG_NS, "polyline");
  line.setAttribute("class", "sparkline-line");
  line.setAttribute("points", points.join(" "));

  svg.replaceChildren(zero, line);
  svg.setAttribute("aria-label", `Sparkline of ${values.length} embedding values from ${low.toFixed(3)} to ${high.toFixed(3)}`);
}

// Slides

function setProgress(card, label, fraction, detail) {
  const bounded = Math.min(1, Math.max(0, fraction));
  $(".progress-label", card).textContent = label;
  $("progress", card).value = bounded;
  // Rounded down, so 100 % appears only once every patch is embedded.
  const percent = `${Math.floor(bounded * 100)} %`;
  $(".progress-text", card).textContent = detail ? `${percent} (${detail})` : percent;
}

function newSlideCard(title) {
  const card = newCard("slide-template", title);
  const progressId = `${card.id}-progress`;
  $("progress", card).id = progressId;
  $(".progress-label", card).htmlFor = progressId;
  return card;
}

async function embedSlide(file) {
  const card = newSlideCard(`Slide ${file.name}`);
  setProgress(card, "Uploading", 0);

  const form = new FormData();
  form.append("file", file);
  form.append("pooling", optionValue("pooling"));
  if (optionValue("mpp")) {
    form.append("mpp", optionValue("mpp"));
  }

  let job;
  try {
    job = await postWithProgress("/v1/slides", form, (fraction) => setProgress(card, "Uploading", fraction));
  } catch (error) {
    card.dataset.status = "failed";
    showError($(".error", card), error.message);
    return;
  }
  card.dataset.jobId = job.id;
  const jobPath = (job.links && job.links.self) || `/v1/jobs/${encodeURIComponent(job.id)}`;
  pollJob(card, jobPath, 0);
}

// Show a job submitted earlier, named by its id, as a slide card: its progress, then its results.
// An id that is not 32 lowercase hex digits is not sent, because the browser rewrites ids such as "." and
// ".." into other paths (for instance /v1/jobs/. becomes /v1/jobs/, the job list).
function showJob(jobId) {
  const card = newSlideCard(`Job ${jobId}`);
  if (!JOB_ID_PATTERN.test(jobId)) {
    card.dataset.status = "failed";
    showError(
      $(".error", card),
      `the job id "${jobId}" in the page's address is invalid: expected 32 lowercase hex digits, as the server returns in "id" ` +
        `when a slide is submitted. Open the page with ?job=<id> and the id of a submitted job.`,
    );
    return;
  }
  card.dataset.jobId = jobId;
  setProgress(card, "Embedding patches", 0);
  pollJob(card, `/v1/jobs/${encodeURIComponent(jobId)}`, 0);
}

async function pollJob(card, jobPath, failures) {
  let job;
  try {
    job = await apiJson(jobPath);
  } catch (error) {
    // A job that is not found (never submitted, deleted, or removed after its retention) does not come back.
    if (error.status === 404) {
      card.dataset.status = "failed";
      showError($(".error", card), error.message);
      return;
    }
    if (failures + 1 >= MAX_POLL_FAILURES) {
      card.dataset.status = "failed";
      showError($(".error", card), `stopped checking the job after ${MAX_POLL_FAILURES} failures: ${error.message}`);
      return;
    }
    $(".status", card).textContent = `Checking the job failed, retrying: ${error.message}`;
    setTimeout(() => pollJob(card, jobPath, failures + 1), SLOW_POLL_INTERVAL_MS);
    return;
  }

  // Any other response, for instance a job list or a proxy's page, would otherwise be polled forever.
  if (!job || !JOB_STATUSES.includes(job.status)) {
    card.dataset.status = "failed";
    const status = job && job.status !== undefined ? JSON.stringify(job.status) : "none";
    showError(
      $(".error", card),
      `GET ${jobPath} returned no job: its status is ${status}, expected one of ${JOB_STATUSES.join(", ")}. ` +
        "Check that the page is served by the student server and that the job id is right.",
    );
    return;
  }

  card.dataset.status = job.status;
  const progress = job.progress || {};
  const total = progress.total || 0;
  const done = progress.done || 0;
  let fraction = total > 0 ? done / total : 0;
  if (job.status === "succeeded") {
    fraction = 1;
  }
  setProgress(card, "Embedding patches", fraction, total > 0 ? `${done} / ${total} patches` : "");

  if (job.status === "succeeded") {
    $(".status", card).textContent = "Done.";
    await showSlideResult(card, job);
  } else if (job.status === "failed") {
    $(".status", card).textContent = "Failed.";
    showError($(".error", card), (job.error && job.error.message) || "the job failed and the server gave no reason.");
  } else if (job.status === "interrupted") {
    $(".status", card).textContent = "Interrupted by a server stop; the job resumes when the server starts again.";
    setTimeout(() => pollJob(card, jobPath, 0), SLOW_POLL_INTERVAL_MS);
  } else {
    $(".status", card).textContent = job.status === "queued" ? "Waiting for an earlier slide to finish." : "Embedding patches.";
    setTimeout(() => pollJob(card, jobPath, 0), POLL_INTERVAL_MS);
  }
}

function jobLink(job, name, fallback) {
  return (job.links && job.links[name]) || `/v1/jobs/${encodeURIComponent(job.id)}/${fallback}`;
}

async function showSlideResult(card, job) {
  const summary = $(".summary", card);
  addSummaryRow(summary, "Slide id", job.slide_id || "");
  addSummaryRow(summary, "Patches", String(job.num_patches));
  try {
    const [result, map, overlayUrl] = await Promise.all([
      apiJson(jobLink(job, "result", "result")),
      apiJson(jobLink(job, "map", "map")),
      apiBlobUrl(jobLink(job, "overlay", "overlay.jpg")),
    ]);
    addSlideEmbeddingRows(summary, result);
    addDownloadLink(summary, jobLink(job, "features", "features.h5"), `${job.slide_id || job.id}.h5`);
    $(".overlay", card).src = overlayUrl;
    // Shown before the map is drawn, because the canvas takes its pixel size from its laid-out size.
    $(".slide-views", card).hidden = false;
    drawMap(card, map);
  } catch (error) {
    showError($(".error", card), error.message);
  }
}

function addSlideEmbeddingRows(summary, result) {
  const embedding = result.slide_embedding || result.embedding || [];
  const sha256 = result.checkpoint_sha256 || (result.metadata && result.metadata.checkpoint_sha256);
  addSummaryRow(summary, "Slide embedding", `${embedding.length}-d, ${result.pooling || "pooled"}`);
  if (result.model) {
    addSummaryRow(summary, "Model", result.model);
  }
  if (sha256) {
    addSummaryRow(summary, "Checkpoint sha256", shortHash(sha256), sha256);
  }
  if (embedding.length > 0) {
    addStatisticsRows(summary, embedding);
  }
}

// A link that downloads the features with the API key, which a plain href cannot send.
function addDownloadLink(summary, path, fileName) {
  const link = document.createElement("a");
  link.href = path;
  link.textContent = "features.h5 (TRIDENT layout)";
  link.addEventListener("click", async (event) => {
    if (!apiKey()) {
      return;
    }
    event.preventDefault();
    try {
      const saver = document.createElement("a");
      saver.href = await apiBlobUrl(path);
      saver.download = fileName;
      saver.click();
    } catch (error) {
      showError($("#page-error"), error.message);
    }
  });
  const dt = document.createElement("dt");
  dt.textContent = "Patch features";
  const dd = document.createElement("dd");
  dd.append(link);
  summary.append(dt, dd);
}

// Start-up

async function showServerStatus() {
  const status = $("#server-status");
  try {
    const models = await apiJson("/v1/models");
    const model = models.data && models.data[0];
    if (model) {
      status.textContent = `Serving ${model.id}: ${model.dim}-d embeddings, checkpoint sha256 ${shortHash(model.checkpoint_sha256)}.`;
      status.title = model.checkpoint_sha256 || "";
      return;
    }
    await apiJson("/readyz");
    status.textContent = "The server is ready.";
  } catch (error) {
    status.textContent =
      error.status === 401
        ? `Unauthorized: ${error.message} Enter the key in the API key field.`
        : `Not ready: ${error.message}`;
  }
}

function setUpApiKey() {
  const input = $("#api-key");
  input.value = apiKey();
  // Stored on each keystroke, so a file dropped before the field loses focus is sent with the key.
  input.addEventListener("input", () => {
    if (input.value) {
      sessionStorage.setItem(API_KEY_STORAGE, input.value);
    } else {
      sessionStorage.removeItem(API_KEY_STORAGE);
    }
  });
  input.addEventListener("change", showServerStatus);
}

function setUpDropZone() {
  const zone = $("#drop-zone");
  const input = $("#file-input");
  input.addEventListener("change", () => {
    handleFiles(input.files);
    // Cleared, so choosing the same file again starts a new upload.
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    handleFiles(event.dataTransfer.files);
  });
}

// Read the server's settings from the data attributes of <body>, which the server fills in when it serves the page.
function readPageSettings() {
  const text = document.body.dataset.tiffSlideMinBytes;
  const value = Number(text);
  if (Number.isSafeInteger(value) && value > 0) {
    tiffSlideMinBytes = value;
    return;
  }
  showError(
    $("#page-error"),
    `the page's setting data-tiff-slide-min-bytes is "${text}", expected a positive whole number of bytes. ` +
      `TIFF files are split into tiles and slides at ${DEFAULT_TIFF_SLIDE_MIN_BYTES} bytes instead. Open the page from the student server's address.`,
  );
}

// Show the jobs named by ?job=<id> in the page's address, in the order given.
function showJobsFromAddress() {
  const jobIds = new URLSearchParams(window.location.search).getAll("job");
  // Each new card goes on top, so the last id is shown first to keep the address's order.
  for (const jobId of jobIds.reverse()) {
    showJob(jobId);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  readPageSettings();
  setUpApiKey();
  setUpDropZone();
  showServerStatus();
  showJobsFromAddress();
});
