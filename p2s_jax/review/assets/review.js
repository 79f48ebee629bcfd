// The review page: cards of data.js (window.P2S_REVIEW), decided with the keyboard, the
// decisions kept in the browser's local storage under the reviewed file's fingerprint and
// exported as decisions.json. No network access: everything it reads sits in its folder.
"use strict";
(function () {
  const data = window.P2S_REVIEW;
  const cards = data.cards;
  const count = cards.id.length;
  const PAGE = 48;
  const storageKey = "p2s-review:" + data.fingerprint;
  const ids = new Set(cards.id.map(String));
  const byId = (name) => document.getElementById(name);
  const grid = byId("cards");
  let decisions = loadDecisions();  // annotation id (string) -> "accept" | "reject"
  const history = [];  // [annotation id, its decision before, position] per decision
  let order = [];  // the card indices that pass the filters, worst first
  let page = 0;
  let cursor = 0;  // position in `order` of the current card

  function loadDecisions() {
    try {
      const kept = JSON.parse(localStorage.getItem(storageKey) || "{}");
      return kept && typeof kept === "object" ? kept : {};
    } catch (err) {
      return {};
    }
  }

  function saveDecisions() {
    try {
      localStorage.setItem(storageKey, JSON.stringify(decisions));
    } catch (err) {
      say("this browser keeps no decisions (local storage is off): export before leaving");
    }
  }

  function say(text) {
    byId("message").textContent = text;
  }

  function number(value, digits) {
    return value === null || value === undefined ? "-" : value.toFixed(digits);
  }

  function cropPath(index) {
    return "crops/" + Math.floor(index / 1000) + "/" + index + ".jpg";
  }

  function makeCard(index, position) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.annId = String(cards.id[index]);
    card.dataset.position = String(position);
    const image = document.createElement("img");
    image.loading = "lazy";
    image.decoding = "async";
    image.alt = "person " + cards.id[index];
    image.width = image.height = data.crop_size;
    image.addEventListener("error", () => card.classList.add("no-photo"));
    image.src = cropPath(index);
    const caption = document.createElement("figcaption");
    const decision = document.createElement("span");
    decision.className = "decision";
    caption.append(decision,
      data.labels.iou + " " + number(cards.iou[index], 3) + " \u00b7 " + data.labels.score +
      " " + number(cards.score[index], 2), document.createElement("br"),
      data.statuses[cards.status[index]] + " \u00b7 image " + cards.image[index] + " \u00b7 " +
      data.files[cards.file[index]], document.createElement("br"), "id " + cards.id[index]);
    card.append(image, caption);
    card.addEventListener("click", () => goTo(position));
    showDecision(card);
    return card;
  }

  function showDecision(card) {
    const value = decisions[card.dataset.annId];
    card.classList.toggle("accept", value === "accept");
    card.classList.toggle("reject", value === "reject");
    card.querySelector(".decision").textContent = value ? value + "ed" : "";
  }

  function render() {
    const start = page * PAGE;
    const end = Math.min(order.length, start + PAGE);
    const cardsOfPage = document.createDocumentFragment();
    for (let position = start; position < end; position++) {
      cardsOfPage.appendChild(makeCard(order[position], position));
    }
    grid.replaceChildren(cardsOfPage);
    const pages = Math.max(1, Math.ceil(order.length / PAGE));
    byId("page").textContent = "page " + (page + 1) + " / " + pages + " (" +
      order.length + " shown)";
    highlight();
  }

  function highlight() {
    const old = grid.querySelector(".card.current");
    if (old) old.classList.remove("current");
    const card = grid.querySelector('[data-position="' + cursor + '"]');
    if (card) {
      card.classList.add("current");
      card.scrollIntoView({block: "nearest"});
    }
  }

  function goTo(position) {
    if (!order.length) return;
    cursor = Math.max(0, Math.min(order.length - 1, position));
    const wanted = Math.floor(cursor / PAGE);
    if (wanted !== page) {
      page = wanted;
      render();
    } else {
      highlight();
    }
  }

  function turn(step) {
    const pages = Math.ceil(order.length / PAGE);
    const wanted = Math.max(0, Math.min(pages - 1, page + step));
    if (wanted !== page) goTo(wanted * PAGE);
  }

  function updateCounts() {
    let accepted = 0;
    let rejected = 0;
    for (const [id, value] of Object.entries(decisions)) {
      if (!ids.has(id)) continue;
      if (value === "accept") accepted++;
      else if (value === "reject") rejected++;
    }
    byId("reviewed").textContent = String(accepted + rejected);
    byId("accepted").textContent = String(accepted);
    byId("rejected").textContent = String(rejected);
  }

  function refresh(id) {
    const card = grid.querySelector('[data-ann-id="' + id + '"]');
    if (card) showDecision(card);
    updateCounts();
  }

  function decide(value) {
    if (!order.length) return;
    const id = String(cards.id[order[cursor]]);
    history.push([id, decisions[id] || null, cursor]);
    decisions[id] = value;
    saveDecisions();
    refresh(id);
    goTo(cursor + 1);
  }

  function undo() {
    const last = history.pop();
    if (!last) return say("nothing to undo");
    const [id, before, position] = last;
    if (before === null) delete decisions[id];
    else decisions[id] = before;
    saveDecisions();
    goTo(position);
    refresh(id);
  }

  function filter() {
    const status = byId("status").value;
    const code = status === "" ? -1 : data.statuses.indexOf(status);
    const low = parseFloat(byId("iou-min").value);
    const high = parseFloat(byId("iou-max").value);
    order = [];
    for (let index = 0; index < count; index++) {
      if (code >= 0 && cards.status[index] !== code) continue;
      const iou = cards.iou[index];
      if ((!isNaN(low) && iou < low) || (!isNaN(high) && iou > high)) continue;
      order.push(index);
    }
    page = 0;
    cursor = 0;
    say(order.length ? "" : "no card passes these filters");
    render();
  }

  function jump() {
    const imageId = Number(byId("image-id").value);
    const position = order.findIndex((index) => cards.image[index] === imageId);
    if (position < 0) return say("image " + imageId + " has no card among those shown");
    say("");
    goTo(position);
  }

  function exportDecisions() {
    const kept = {};
    for (let index = 0; index < count; index++) {
      const id = String(cards.id[index]);
      if (decisions[id]) kept[id] = decisions[id];
    }
    const text = JSON.stringify({source: data.source, fingerprint: data.fingerprint,
                                 decisions: kept}, null, 1);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text + "\n"], {type: "application/json"}));
    link.download = "decisions.json";
    document.body.appendChild(link);
    link.click();
    link.remove();
    say("exported " + Object.keys(kept).length + " decisions as decisions.json");
  }

  const keys = {
    ArrowRight: () => goTo(cursor + 1), j: () => goTo(cursor + 1),
    ArrowLeft: () => goTo(cursor - 1), k: () => goTo(cursor - 1),
    a: () => decide("accept"), r: () => decide("reject"), u: undo,
    n: () => turn(1), PageDown: () => turn(1), p: () => turn(-1), PageUp: () => turn(-1),
  };
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest && event.target.closest("input, select, textarea")) return;
    const action = keys[event.key];
    if (!action) return;
    event.preventDefault();
    action();
  });

  for (const [code, status] of data.statuses.entries()) {
    const option = document.createElement("option");
    const many = cards.status.reduce((sum, value) => sum + (value === code), 0);
    option.value = status;
    option.textContent = status + " (" + many + ")";
    byId("status").appendChild(option);
  }
  byId("source").textContent = data.source;
  byId("mode").textContent = (data.mode === "evaluate" ? "error analysis" : "annotate output") +
    ", " + data.schema + ", worst " + data.labels.iou + " first";
  byId("iou-label").textContent = data.labels.iou;
  byId("total").textContent = String(count);
  document.title = "p2s review: " + data.source;
  for (const name of ["status", "iou-min", "iou-max"]) byId(name).addEventListener("change", filter);
  byId("jump").addEventListener("click", jump);
  byId("image-id").addEventListener("keydown", (event) => {
    if (event.key === "Enter") jump();
  });
  byId("previous-page").addEventListener("click", () => turn(-1));
  byId("next-page").addEventListener("click", () => turn(1));
  byId("export").addEventListener("click", exportDecisions);
  updateCounts();
  filter();
  window.P2S_READY_MS = performance.now();
})();
