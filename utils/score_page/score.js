// The rating page: a grid of the round's images and a full-screen view to score them, or two images
// side by side to compare. Every change is POSTed to score.py, which writes samples/scores.json (or
// samples/comparisons.json) before it answers.
"use strict";

const MIN_SCORE = -5;
const MAX_SCORE = 5;
const ORDER_KEY = "almostperfect-order"; // the chosen order survives a reload
const $ = (id) => document.getElementById(id);

let images = [];      // [{file, score (null = unscored), prompt, seed, lora, width, height, seedIndex}], in the chosen order
let promptCount = 0;  // distinct prompts of the round: with more than one, tiles show theirs and the grid can filter
let tiles = [];       // the grid's buttons, in the same order
let informativeOrder = null; // files, most informative first (from the reward ensemble), or null when there is none
let pair = null;      // {a, b}: the two files being compared; null while the comparison view is closed or empty
let comparing = false;
let comparePending = false; // one comparison at a time: the next pair depends on the answer
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
  images.forEach((image, index) => { image.seedIndex = index; });
  informativeOrder = state.order;
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
  promptCount = new Set(images.map((image) => image.prompt)).size;
  buildGrid();
  buildScale();
  setUpOrder(state.order_note);
  setUpPromptFilter();
  $("compare-count").textContent = comparisonCount(state.comparisons);
  $("help").hidden = false;
  $("only-unscored").addEventListener("change", applyFilter);
  $("vote-up").addEventListener("click", () => changeScore(current, +1));
  $("vote-down").addEventListener("click", () => changeScore(current, -1));
  $("viewer-close").addEventListener("click", closeViewer);
  $("compare-open").addEventListener("click", openCompare);
  $("compare-close").addEventListener("click", closeCompare);
  $("compare-a").addEventListener("click", () => compare("a"));
  $("compare-b").addEventListener("click", () => compare("b"));
  $("compare-tie").addEventListener("click", () => compare("tie"));
  document.addEventListener("keydown", onKey);
  updateCounts();
  showStatus("All changes saved", "saved");
}

// ---------------------------------------------------------------- grid

function buildGrid() {
  tiles = images.map((image) => {
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
    if (promptCount > 1) {
      const caption = document.createElement("span");
      caption.className = "caption";
      caption.textContent = image.prompt || "(no prompt)";
      caption.title = image.prompt; // the whole prompt on hover; the caption shows its start
      tile.append(caption);
    }
    tile.addEventListener("click", () => openViewer(tiles.indexOf(tile))); // the order can change
    $("grid").append(tile);
    return tile;
  });
  images.forEach((_, index) => showScore(index));
}

function imageUrl(image) {
  return `images/${encodeURIComponent(image.file)}`;
}

function isShown(index) {
  const prompt = $("prompt-filter").value;
  const unscoredOrAll = !$("only-unscored").checked || images[index].score === null;
  return unscoredOrAll && (prompt === "" || images[index].prompt === prompt);
}

function applyFilter() {
  tiles.forEach((tile, index) => { tile.hidden = !isShown(index); });
  $("all-done").hidden = !($("only-unscored").checked && images.every((_, index) => !isShown(index)));
  $("all-done-scope").textContent = $("prompt-filter").value === "" ? "of this round" : "of this prompt";
}

// With several prompts (a round made from a prompt_file): a choice of one prompt's images, most images first.
function setUpPromptFilter() {
  if (promptCount < 2) return;
  const counts = new Map();
  images.forEach((image) => counts.set(image.prompt, (counts.get(image.prompt) || 0) + 1));
  const select = $("prompt-filter");
  select.firstElementChild.textContent = `every prompt (${promptCount})`;
  for (const [prompt, count] of [...counts].sort((a, b) => b[1] - a[1])) {
    const option = document.createElement("option");
    option.value = prompt;
    option.textContent = `${prompt.length > 60 ? `${prompt.slice(0, 59)}…` : prompt || "(no prompt)"} (${count})`;
    option.title = prompt;
    select.append(option);
  }
  select.addEventListener("change", applyFilter);
  $("prompt-choice").hidden = false;
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

// ---------------------------------------------------------------- order: seed order or most informative first

function setUpOrder(note) {
  const select = $("order");
  select.querySelector('option[value="informative"]').disabled = informativeOrder === null;
  if (informativeOrder === null) {
    select.title = `most informative first: ${note}`;
    $("order-note").textContent = `“Most informative first” needs a reward ensemble: ${note}.`;
  }
  select.value = informativeOrder !== null && localStorage.getItem(ORDER_KEY) === "informative" ? "informative" : "seed";
  select.addEventListener("change", () => {
    localStorage.setItem(ORDER_KEY, select.value);
    applyOrder();
  });
  applyOrder();
}

// Reorder images and tiles together (the most informative first, the rest after them in seed order).
function applyOrder() {
  const rank = new Map($("order").value === "informative" ? informativeOrder.map((file, i) => [file, i]) : []);
  const position = (image) => rank.get(image.file) ?? rank.size + image.seedIndex;
  const order = images.map((image, i) => i).sort((i, j) => position(images[i]) - position(images[j]));
  images = order.map((i) => images[i]);
  tiles = order.map((i) => tiles[i]);
  $("grid").append(...tiles);
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
    .then(() => postJson("api/score", { file, score }))
    .catch((error) => { saveError = `Not saved: ${error.message}. Reload the page to see what is saved.`; })
    .finally(() => { pendingSaves -= 1; showSaveState(); });
}

// POST a rating to score.py, which saves it before it answers; resolves to its answer, or throws its error.
async function postJson(path, body) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (error) {
    throw new Error(`score.py does not answer (${error.message}); is it still running?`);
  }
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error);
  return answer;
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
  if (comparing) {
    onCompareKey(event);
    return;
  }
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
  if (event.key === "c" || event.key === "C") {
    openCompare();
    event.preventDefault();
    return;
  }
  const onControl = event.target.closest("button, input, a, select"); // Enter there means that control
  if (event.key !== "Enter" || onControl) return;
  const first = images.findIndex((image, index) => image.score === null && isShown(index));
  const shown = images.findIndex((_, index) => isShown(index));
  openViewer(first !== -1 ? first : Math.max(shown, 0));
  event.preventDefault();
}

// ---------------------------------------------------------------- comparing two images

async function openCompare() {
  comparing = true;
  $("compare").hidden = false;
  document.body.classList.add("viewing");
  $("compare").focus();
  try {
    const response = await fetch("api/next_pair");
    showPair(await response.json());
  } catch (error) {
    saveError = `Cannot get a pair to compare (${error.message}); is score.py still running?`;
    showSaveState();
  }
}

function closeCompare() {
  comparing = false;
  pair = null;
  $("compare").hidden = true;
  document.body.classList.remove("viewing");
}

function comparisonCount(count) {
  return `${count} comparison${count === 1 ? "" : "s"} saved`;
}

// next: {a, b, comparisons} from score.py; a is null when no pair is left
function showPair(next) {
  $("compare-count").textContent = comparisonCount(next.comparisons);
  pair = next.a === null ? null : next;
  $("compare-pair").hidden = pair === null;
  $("compare-done").hidden = pair !== null;
  $("compare-prompt").textContent = "";
  if (pair === null) return;
  const first = images.find((candidate) => candidate.file === pair.a);
  if (promptCount > 1 && first) $("compare-prompt").textContent = first.prompt; // score.py pairs one prompt's images
  for (const side of ["a", "b"]) {
    const image = images.find((candidate) => candidate.file === pair[side]);
    $(`compare-image-${side}`).src = imageUrl({ file: pair[side] });
    $(`compare-image-${side}`).alt = `seed ${image ? image.seed : pair[side]}`;
    $(`compare-seed-${side}`).textContent = `seed ${image ? image.seed : pair[side]}`;
  }
}

// winner: "a" (left), "b" (right) or "tie"; saved by score.py, which answers with the next pair
async function compare(winner) {
  if (pair === null || comparePending) return;
  comparePending = true;
  pendingSaves += 1;
  showSaveState();
  try {
    const answer = await postJson("api/compare", { a: pair.a, b: pair.b, winner });
    if (comparing) showPair(answer.next);
  } catch (error) {
    saveError = `Not saved: ${error.message}. Reload the page to see what is saved.`;
  } finally {
    comparePending = false;
    pendingSaves -= 1;
    showSaveState();
  }
}

function onCompareKey(event) {
  if (event.key === "Escape") closeCompare();
  else if (event.key === "ArrowLeft") compare("a");
  else if (event.key === "ArrowRight") compare("b");
  else if (event.key === "ArrowDown") compare("tie");
  else return;
  event.preventDefault();
}
