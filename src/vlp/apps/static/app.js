// The page of `vlp serve`: plain DOM calls against the JSON API; no framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let image = null; // the dropped or picked file
let abilities = {};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

// fetch -> parsed JSON; a non-2xx answer throws its one-line "detail".
async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function form(fields) {
  const data = new FormData();
  data.append("image", image);
  for (const [name, value] of Object.entries(fields)) data.append(name, value);
  return { method: "POST", body: data };
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showResults(title, results) {
  $("results-title").textContent = title;
  $("results-title").hidden = false;
  const grid = $("results");
  grid.replaceChildren();
  results.forEach((hit, rank) => {
    const figure = element("figure");
    figure.dataset.id = hit.id;
    figure.dataset.path = hit.path;
    const img = element("img");
    img.src = hit.thumbnail;
    img.alt = hit.caption || hit.path.split("/").pop();
    img.title = hit.path;
    const caption = element("figcaption");
    caption.append(element("span", "rank", `#${rank + 1}`), element("span", "score", hit.score.toFixed(3)));
    if (hit.caption) caption.append(element("div", "text", hit.caption));
    figure.append(img, caption);
    grid.append(figure);
  });
  if (!results.length) grid.append(element("p", "note", "no results"));
}

async function searchText(event) {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  try {
    const answer = await api(`/api/search?q=${encodeURIComponent(query)}&k=24`);
    showResults(`Best matches for “${query}”`, answer.results);
  } catch (err) { showError(err.message); }
}

async function label(event) {
  if (event) event.preventDefault();
  if (!image || !abilities.classify) return;
  const out = $("labels-out");
  try {
    const answer = await api("/api/classify", form({ labels: $("labels").value, top_k: 5 }));
    out.replaceChildren(...answer.labels.map(({ label, probability }) => {
      const item = element("li", "", `${label} ${(100 * probability).toFixed(1)} %`);
      const bar = element("span", "bar");
      bar.style.width = `${Math.max(2, 100 * probability)}%`;
      item.append(bar);
      return item;
    }));
  } catch (err) { out.replaceChildren(); showError(err.message); }
}

async function ask(event) {
  if (event) event.preventDefault();
  const question = $("question").value.trim();
  if (!image || !abilities.ask || !question) return;
  try {
    $("answer").textContent = (await api("/api/ask", form({ question }))).answer;
  } catch (err) { $("answer").textContent = ""; showError(err.message); }
}

async function caption() {
  if (!abilities.caption) return;
  $("caption").textContent = "…";
  try {
    $("caption").textContent = (await api("/api/caption", form({}))).caption;
  } catch (err) { $("caption").textContent = ""; showError(err.message); }
}

async function searchImage() {
  try {
    showResults("Images like yours", (await api("/api/search/image", form({ k: 24 }))).results);
  } catch (err) { showError(err.message); }
}

function useImage(file) {
  if (!file) return;
  image = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = file.name;
  $("answer").textContent = "";
  searchImage();
  caption();
  label();
  ask();
}

async function start() {
  try {
    const info = await api("/api/info");
    abilities = info.abilities;
    $("about").textContent = [`${info.images} images`, info.recipe, info.model].filter(Boolean).join(" · ");
    const missing = [];
    for (const box of document.querySelectorAll("[data-ability]")) {
      box.hidden = !abilities[box.dataset.ability];
      if (box.hidden) missing.push(box.dataset.ability);
    }
    if (missing.length) $("cannot").textContent = `This model (${info.recipe}) cannot ${missing.join(", ")}.`;
  } catch (err) { showError(err.message); }
  $("search-form").addEventListener("submit", searchText);
  $("labels-form").addEventListener("submit", label);
  $("ask-form").addEventListener("submit", ask);
  $("file").addEventListener("change", (event) => useImage(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useImage(event.dataTransfer.files[0]);
  });
  document.body.dataset.ready = "true";
}

start();
