// The rating page: a grid of the round's images and a full-screen view to score them.
// Every change is POSTed to score.py, which writes samples/scores.json before it answers.
"use strict";

const MIN_SCORE = -5;
const MAX_SCORE = 5;
const $ = (id) => document.getElementById(id);

let images = [];      // [{file, score (null = unscored), prompt, seed, lora, width, height}], in seed order
let tiles = [];       // the grid's buttons, in the same order
let current = null;   // index of the image in the full-screen view; null while the grid shows
let pendingSaves = 0;
let saveError = null; // stays shown: a lost change matters more than the saves after it
let saveQueue = Promise.resolve(); // one save at a time, in order, so quick presses end with the last score

document.addEventListener("DOMContentLoaded", start);

async function start() {
  let state;
  try {
    state = await (await fetch("api/state")).json();
  } catch (error) {
    showStatus(`Cannot reach score.py (${error.message}). Is it running?`, "error");
    return;
  }
  images = state.images;
  if (state.notice) {
    $("notice").textContent = state.notice;
    $("notice").hidden = false;
  }
  if (images.length === 0) {
    $("empty-folder").textContent = state.sample_path;
    $("empty").hidden = false;
    document.body.classList.add("empty");
    showStatus("", "");
    return;
  }
  buildGrid();
  buildScale();
  $("help").hidden = false;
  $("only-unscored").addEventListener("change", applyFilter);
  $("vote-up").addEventListener("click", () => changeScore(current, +1));
  $("vote-down").addEventListener("click", () => changeScore(current, -1));
  $("viewer-close").addEventListener("click", closeViewer);
  document.addEventListener("keydown", onKey);
  updateCounts();
  showStatus("All changes saved", "saved");
}

// ---------------------------------------------------------------- grid

function buildGrid() {
  tiles = images.map((image, index) => {
    const tile = document.createElement("button");
    tile.className = "tile";
    // a size before the image loads keeps lazy loading lazy: zero-height tiles would all be "visible"
    tile.style.aspectRatio = `${image.width || 2} / ${image.height || 3}`;
    tile.title = `seed ${image.seed}`;
    const picture = document.createElement("img");
    picture.loading = "lazy"; // before src, or the browser starts loading at once
    picture.alt = `seed ${image.seed}`;
    picture.src = imageUrl(image);
    const badge = document.createElement("span");
    badge.className = "badge";
    tile.append(picture, badge);
    tile.addEventListener("click", () => openViewer(index));
    $("grid").append(tile);
    return tile;
  });
  images.forEach((_, index) => showScore(index));
}

function imageUrl(image) {
  return `images/${encodeURIComponent(image.file)}`;
}

function isShown(index) {
  return !$("only-unscored").checked || images[index].score === null;
}

function applyFilter() {
  tiles.forEach((tile, index) => { tile.hidden = !isShown(index); });
  $("all-done").hidden = !($("only-unscored").checked && scoredCount() === images.length);
}

function scoredCount() {
  return images.filter((image) => image.score !== null).length;
}

function updateCounts() {
  const scored = scoredCount();
  const percent = Math.round((100 * scored) / images.length);
  $("counter").textContent = `${images.length} loaded / ${scored} scored`;
  $("progress-fill").style.width = `${percent}%`;
  $("progress").setAttribute("aria-valuenow", percent);
  $("progress").title = `${percent}% of the round scored`;
}

function formatScore(score) {
  if (score === null) return "–";
  return score > 0 ? `+${score}` : score < 0 ? `−${-score}` : "0";
}

function signClass(score) {
  return score === null ? "unscored" : score > 0 ? "positive" : score < 0 ? "negative" : "neutral";
}

// ---------------------------------------------------------------- scores

function showScore(index) {
  const score = images[index].score;
  const badge = tiles[index].querySelector(".badge");
  badge.textContent = formatScore(score);
  badge.className = `badge ${signClass(score)}`;
  badge.hidden = score === null;
  if (index === current) showViewerScore();
}

function setScore(index, score) {
  if (images[index].score === score) return;
  images[index].score = score;
  showScore(index);
  updateCounts();
  save(images[index].file, score);
}

function changeScore(index, step) {
  const score = Math.min(MAX_SCORE, Math.max(MIN_SCORE, (images[index].score ?? 0) + step));
  setScore(index, score);
}

function save(file, score) {
  pendingSaves += 1;
  showSaveState();
  saveQueue = saveQueue
    .then(() => postScore(file, score))
    .catch((error) => { saveError = `Not saved: ${error.message}. Reload the page to see what is saved.`; })
    .finally(() => { pendingSaves -= 1; showSaveState(); });
}

async function postScore(file, score) {
  let response;
  try {
    response = await fetch("api/score", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ file, score }),
    });
  } catch (error) {
    throw new Error(`score.py does not answer (${error.message}); is it still running?`);
  }
  if (!response.ok) throw new Error((await response.json()).error);
}

function showSaveState() {
  if (saveError) showStatus(saveError, "error");
  else if (pendingSaves > 0) showStatus("Saving…", "saving");
  else showStatus("All changes saved", "saved");
}

function showStatus(text, kind) {
  $("save-status").textContent = text;
  $("save-status").className = `save-status ${kind}`;
}

// ---------------------------------------------------------------- full-screen view

function buildScale() {
  for (let score = MIN_SCORE; score <= MAX_SCORE; score += 1) {
    const cell = document.createElement("button");
    cell.textContent = formatScore(score);
    cell.dataset.score = score;
    cell.tabIndex = -1; // the keys do this faster; keep Tab for the few real controls
    cell.addEventListener("click", () => setScore(current, score));
    $("score-scale").append(cell);
  }
}

function openViewer(index) {
  current = index;
  $("viewer").hidden = false;
  document.body.classList.add("viewing");
  $("viewer").focus(); // away from the grid's tile, which Enter or Space would click again
  showViewerImage();
}

function closeViewer() {
  const tile = tiles[current];
  current = null;
  $("viewer").hidden = true;
  document.body.classList.remove("viewing");
  applyFilter();
  tile.focus({ preventScroll: true });
  tile.scrollIntoView({ block: "nearest" });
}

function showViewerImage() {
  const image = images[current];
  $("viewer-image").src = imageUrl(image);
  $("viewer-image").alt = `seed ${image.seed}`;
  const next = neighbour(current, +1);
  const end = next === null ? (($("only-unscored").checked) ? " · no more unscored after this" : " · the last one") : "";
  $("viewer-position").textContent = `${current + 1} of ${images.length}${end}`;
  $("viewer-prompt").textContent = image.prompt || "(none in the PNG)";
  $("viewer-seed").textContent = image.seed;
  $("viewer-lora").textContent = image.lora || "none";
  showViewerScore();
  [next, neighbour(current, -1)].forEach((index) => {
    if (index !== null) new Image().src = imageUrl(images[index]); // the next key press shows it at once
  });
}

function showViewerScore() {
  const score = images[current].score;
  $("viewer-score").textContent = formatScore(score);
  $("viewer-score").className = `score-value ${signClass(score)}`;
  for (const cell of $("score-scale").children) {
    cell.classList.toggle("chosen", score !== null && Number(cell.dataset.score) === score);
  }
}

// The nearest image from `index` in direction `step` (+1 or -1) that the filter shows, or null.
function neighbour(index, step) {
  for (let i = index + step; i >= 0 && i < images.length; i += step) {
    if (isShown(i)) return i;
  }
  return null;
}

function move(step) {
  const index = neighbour(current, step);
  if (index === null) return;
  current = index;
  showViewerImage();
}

// ---------------------------------------------------------------- keys

function digitOf(code) {
  const match = /^(?:Digit|Numpad)([0-9])$/.exec(code); // the key, not the character: Shift+3 is "#" on many layouts
  return match ? Number(match[1]) : null;
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return; // the browser's own shortcuts
  if (current === null) {
    onGridKey(event);
    return;
  }
  const digit = digitOf(event.code);
  if (event.key === "Escape") closeViewer();
  else if (event.key === "ArrowLeft") move(-1);
  else if (event.key === "ArrowRight") move(+1);
  else if (event.key === "ArrowUp") changeScore(current, +1);
  else if (event.key === "ArrowDown") changeScore(current, -1);
  else if (event.key === "Delete" || event.key === "Backspace") setScore(current, null);
  else if (digit !== null && digit <= MAX_SCORE) {
    setScore(current, event.shiftKey ? -digit : digit);
    move(+1);
  } else return;
  event.preventDefault();
}

function onGridKey(event) {
  const onControl = event.target.closest("button, input, a"); // Enter there means that control
  if (event.key !== "Enter" || onControl) return;
  const first = images.findIndex((image) => image.score === null);
  openViewer(first === -1 ? 0 : first);
  event.preventDefault();
}
