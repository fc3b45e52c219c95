// Smart Gallery web page: plain JavaScript over the gallery API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 24;
const state = {
  userId: null, name: null, key: localStorage.getItem("sg.apiKey") || "",
  search: null,   // {kind: "text"|"image"|"upload", body|file, offset}
  job: null, objectUrls: [],
};

// ------------------------------------------------------------------ API calls

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {  // FastAPI validation errors
    return detail.map((d) => `${(d.loc || []).filter((x) => x !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  return JSON.stringify(detail);
}

async function api(method, path, {params = {}, json, form} = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  const headers = {};
  if (state.key) headers["X-API-Key"] = state.key;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  let response;
  try {
    response = await fetch(url, {method, headers, body});
  } catch (e) {
    throw new ApiError(0, "The server cannot be reached. Is it still running?");
  }
  // No key, or a gallery that exists and needs its key: ask for one.
  if (response.status === 401 || (response.status === 409 && path === "/db/initialize")) $("key-form").hidden = false;
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = describe((await response.json()).detail); } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  return response.json();
}

function showError(error) {
  const box = $("error");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  const prefix = error.status === 401 ? "This server needs its API key: " :
    error.status === 404 && /user_id/.test(error.message) ? "This gallery no longer exists: " : "";
  box.textContent = prefix + (error.message || String(error));
  box.hidden = false;
}

async function guarded(button, work) {
  showError(null);
  if (button) button.disabled = true;
  try { return await work(); } catch (error) { showError(error); } finally { if (button) button.disabled = false; }
}

// Images: plain URLs, or fetched with the key header when the server has one.
function imageUrl(id, kind) {
  const url = new URL(`/images/${encodeURIComponent(id)}/${kind}`, location.origin);
  url.searchParams.set("user_id", state.userId);
  return url;
}

async function setImage(img, id, kind) {
  const url = imageUrl(id, kind);
  if (!state.key) { img.src = url; return; }
  const response = await fetch(url, {headers: {"X-API-Key": state.key}});
  if (!response.ok) return;
  const objectUrl = URL.createObjectURL(await response.blob());
  state.objectUrls.push(objectUrl);
  img.src = objectUrl;
}

// ------------------------------------------------------------------ galleries

function savedGalleries() {
  try { return JSON.parse(localStorage.getItem("sg.galleries") || "{}"); } catch (e) { return {}; }
}

function rememberGallery(name, id) {
  const all = savedGalleries();
  all[name] = id;
  localStorage.setItem("sg.galleries", JSON.stringify(all));
  localStorage.setItem("sg.last", name);
  fillGalleryList();
}

function fillGalleryList() {
  const list = $("gallery-list");
  list.replaceChildren(...Object.keys(savedGalleries()).map((name) => Object.assign(document.createElement("option"), {value: name})));
}

// Per-gallery API keys: /db/initialize answers a new gallery's key once; this browser keeps it.
function galleryKeys() {
  try { return JSON.parse(localStorage.getItem("sg.keys") || "{}"); } catch (e) { return {}; }
}

function rememberKey(name, key) {
  const all = galleryKeys();
  all[name] = key;
  localStorage.setItem("sg.keys", JSON.stringify(all));
}

async function openGallery(name) {
  state.key = galleryKeys()[name] || localStorage.getItem("sg.apiKey") || "";
  const info = await api("POST", "/db/initialize", {json: {user_name: name}});
  if (info.api_key) { rememberKey(info.user_name, info.api_key); state.key = info.api_key; }
  state.userId = info.user_id;
  state.name = info.user_name;
  rememberGallery(info.user_name, info.user_id);
  $("workspace").hidden = false;
  clearResults();
  $("result-summary").textContent = "";
  $("job").hidden = true;
  showInfo(info);
  const pending = localStorage.getItem(`sg.job.${state.userId}`);
  if (pending && !state.job) followJob(pending);
  return info;
}

function showInfo(info) {
  const warn = info.needs_reindex ? " — embedded by another model: re-index it (POST /db/reindex)" : "";
  $("gallery-info").textContent = `“${info.user_name}”: ${info.images} image${info.images === 1 ? "" : "s"}${warn}`;
}

async function refreshInfo() {
  if (state.userId) showInfo(await api("GET", "/db/info", {params: {user_id: state.userId}}));
}

// ------------------------------------------------------------------ add folder (background job)

async function addFolder(path) {
  const started = await api("POST", "/images/add-folder",
    {params: {user_id: state.userId, background: "true"}, json: {folder_path: path}});
  followJob(started.job_id);
}

function followJob(jobId) {
  state.job = jobId;
  localStorage.setItem(`sg.job.${state.userId}`, jobId);  // a reload resumes the progress display
  $("job").hidden = false;
  $("job-cancel").hidden = false;
  $("folder-add").disabled = true;
  $("job-failures").hidden = true;
  $("job-status").textContent = "Starting…";
  pollJob(jobId);
}

async function pollJob(jobId) {
  let job;
  try {
    job = await api("GET", `/jobs/${jobId}`, {params: {user_id: state.userId}});
  } catch (error) {
    localStorage.removeItem(`sg.job.${state.userId}`);
    if (error.status !== 404) showError(error);  // 404: the job is gone (server restarted)
    return finishJob();
  }
  showJob(job);
  if (job.state === "queued" || job.state === "running") {
    setTimeout(() => pollJob(jobId), 400);
  } else {
    localStorage.removeItem(`sg.job.${state.userId}`);
    finishJob();
    refreshInfo().catch(showError);
    if (job.state === "failed") showError(new Error(`Adding the folder failed: ${job.error}`));
  }
}

function showJob(job) {
  const progress = $("job-progress");
  progress.max = Math.max(job.total, 1);
  progress.value = job.done;
  const words = {queued: "Waiting", running: "Adding", done: "Done", failed: "Failed", cancelled: "Cancelled"};
  const total = job.total ? job.total : "…";
  const parts = [`${words[job.state]}: ${job.done}/${total}`, `${job.added} added`];
  if (job.unchanged) parts.push(`${job.unchanged} already there`);
  if (job.duplicates) parts.push(`${job.duplicates} duplicates`);
  parts.push(`${job.failed} failed`);
  if (job.images_per_second) parts.push(`${job.images_per_second.toFixed(1)} images/s`);
  $("job-status").textContent = parts.join(" · ");
  $("job-status").dataset.state = job.state;
  const failures = $("job-failures");
  if (job.failed_files.length) {
    failures.hidden = false;
    failures.querySelector("ul").replaceChildren(...job.failed_files.map((f) =>
      Object.assign(document.createElement("li"), {textContent: `${f.path}: ${f.reason}`})));
  }
}

function finishJob() {
  state.job = null;
  $("job-cancel").hidden = true;
  $("folder-add").disabled = false;
}

async function uploadFiles(files) {
  const status = $("upload-status");
  let added = 0, same = 0, failed = 0;
  const problems = [];
  for (const [index, file] of files.entries()) {
    status.textContent = `Uploading ${index + 1}/${files.length}…`;
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const result = await api("POST", "/images/upload", {params: {user_id: state.userId}, form});
      if (result.status === "added" || result.status === "updated") added += 1; else same += 1;
    } catch (error) {
      failed += 1;
      problems.push(`${file.name}: ${error.message}`);
    }
  }
  status.textContent = `Uploaded: ${added} added, ${same} already there, ${failed} failed`;
  if (problems.length) showError(new Error(problems.join(" — ")));
  await refreshInfo();
}

// ------------------------------------------------------------------ search and results

function clearResults() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  $("results").replaceChildren();
  $("more").hidden = true;
}

async function runSearch(search, append = false) {
  const params = {user_id: state.userId};
  let result;
  if (search.kind === "text") {
    result = await api("POST", "/images/search", {params, json: {...search.body, top_k: PAGE, offset: search.offset}});
  } else if (search.kind === "image") {
    result = await api("POST", "/images/search-by-image", {params, json: {image_id: search.imageId, top_k: PAGE, offset: search.offset}});
  } else {
    const form = new FormData();
    form.append("file", search.file, search.file.name || "image");
    form.append("top_k", String(PAGE));
    form.append("offset", String(search.offset));
    result = await api("POST", "/images/search-by-image", {params, form});
  }
  state.search = search;
  if (!append) clearResults();
  showResults(result, search);
}

function showResults(result, search) {
  const list = $("results");
  for (const hit of result.results) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    const name = hit.path.split("/").pop();
    button.setAttribute("aria-label", `${name}, score ${hit.score.toFixed(3)}, rank ${hit.rank}`);
    const img = document.createElement("img");
    img.alt = name;
    img.loading = "lazy";
    setImage(img, hit.id, "thumbnail");
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.append(Object.assign(document.createElement("span"), {className: "name", textContent: name, title: hit.path}),
      Object.assign(document.createElement("span"), {className: "score", textContent: hit.score.toFixed(3)}));
    button.append(img, caption);
    button.addEventListener("click", () => openViewer(hit).catch(showError));
    item.append(button);
    list.append(item);
  }
  const shown = list.children.length;
  const what = search.kind === "text" ? `“${search.body.query}”` + (result.negative_terms.length ? ` without ${result.negative_terms.map((t) => `“${t}”`).join(", ")}` : "")
    : search.kind === "image" ? "pictures like the one you chose" : `pictures like ${search.file.name || "your image"}`;
  $("result-summary").textContent = shown ? `${shown} result${shown === 1 ? "" : "s"} for ${what} among ${result.total_images} images`
    : result.total_images ? `Nothing found for ${what}.` : "This gallery is empty: add a folder first.";
  const more = result.results.length === PAGE && search.offset + PAGE < Math.min(result.total_images, 1000);
  $("more").hidden = !more;
}

// ------------------------------------------------------------------ viewer

function formatBytes(n) {
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

async function openViewer(hit) {
  const info = await api("GET", `/images/${hit.id}`, {params: {user_id: state.userId}});
  $("viewer-name").textContent = info.path.split("/").pop();
  const img = $("viewer-image");
  img.alt = info.path;
  img.removeAttribute("src");
  setImage(img, info.id, "file");
  const rows = [
    ["Path", info.path],
    ["Size", `${formatBytes(info.size)}${info.width ? ` · ${info.width} × ${info.height} px` : ""}`],
    ["Modified", new Date(info.modified_at * 1000).toLocaleString()],
    ["Added", new Date(info.added_at * 1000).toLocaleString()],
    ["Score", hit.score.toFixed(4)],
  ];
  if (!info.exists) rows.push(["Note", "the file is gone since it was added"]);
  $("viewer-meta").replaceChildren(...rows.flatMap(([k, v]) => [
    Object.assign(document.createElement("dt"), {textContent: k}),
    Object.assign(document.createElement("dd"), {textContent: v})]));
  $("similar").dataset.id = info.id;
  $("viewer").showModal();
  $("similar").focus();
}

// ------------------------------------------------------------------ wiring

function searchByFile(file) {
  if (!file) return;
  if (!state.userId) { showError(new Error("Open a gallery first.")); return; }
  guarded(null, () => runSearch({kind: "upload", file, offset: 0}));
}

function init() {
  fillGalleryList();
  $("api-key").value = state.key;
  const last = localStorage.getItem("sg.last");
  if (last) {  // reopen the gallery used last in this browser
    $("gallery-name").value = last;
    guarded(null, () => openGallery(last));
  }

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    if (state.name) rememberKey(state.name, state.key); else localStorage.setItem("sg.apiKey", state.key);
    showError(null);
  });
  $("gallery-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded($("gallery-open"), () => openGallery($("gallery-name").value.trim()));
  });
  $("folder-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(null, () => addFolder($("folder-path").value.trim()));
  });
  $("upload-files").addEventListener("change", () => {
    const files = [...$("upload-files").files];
    $("upload-files").value = "";
    if (files.length) guarded($("upload-files"), () => uploadFiles(files));
  });
  $("job-cancel").addEventListener("click", () => {
    if (state.job) guarded($("job-cancel"), () => api("DELETE", `/jobs/${state.job}`, {params: {user_id: state.userId}}));
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const body = {query: $("query").value.trim()};
    const negative = $("negative").value.trim();
    if (negative) body.negative = negative;
    guarded($("search-button"), () => runSearch({kind: "text", body, offset: 0}));
  });
  $("more").addEventListener("click", () => {
    const next = {...state.search, offset: state.search.offset + PAGE};
    guarded($("more"), () => runSearch(next, true));
  });
  $("similar").addEventListener("click", () => {
    const id = $("similar").dataset.id;
    $("viewer").close();
    guarded(null, () => runSearch({kind: "image", imageId: id, offset: 0}));
  });

  const drop = $("drop"), input = $("image-file");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => { searchByFile(input.files[0]); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    searchByFile(e.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", init);
