// The tally console: pages drawn from the api's own /v1 endpoints (the session cookie signs
// the requests in). No external requests; every value goes in through textContent, never as
// HTML. Each page sets document.body.dataset.ready to its name once drawn (tests wait on it).
"use strict";

const page = () => document.getElementById("page");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function get(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  if (response.status === 401) {
    location.href = "/";
    throw new Error("signed out");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
  return body;
}

function table(headings, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headings.map(([text, numeric]) => el("th", numeric ? { class: "n" } : {}, text)))),
    el("tbody", {}, rows));
}

function card(label, value, key, cls) {
  return el("div", { class: "card" }, el("b", { "data-figure": key, class: cls || "" }, value), label);
}

// The last `days` whole UTC days up to today, as a usage query.
function lastDays(days) {
  const end = new Date();
  end.setUTCHours(0, 0, 0, 0);
  end.setUTCDate(end.getUTCDate() + 1);
  const start = new Date(end);
  start.setUTCDate(start.getUTCDate() - days);
  const iso = (d) => d.toISOString().replace(".000Z", "Z");
  return `from=${encodeURIComponent(iso(start))}&to=${encodeURIComponent(iso(end))}&window=day&tz=UTC`;
}

// A bar chart of usage windows (SVG, drawn here).
function chart(windows) {
  const ns = "http://www.w3.org/2000/svg";
  const width = 640, height = 180, pad = 24;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height + pad);
  const values = windows.map((w) => Number(w.usage));
  const max = Math.max(1, ...values);
  const step = (width - pad) / Math.max(1, windows.length);
  windows.forEach((w, i) => {
    const h = Math.max(0, (Number(w.usage) / max) * (height - pad));
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", pad + i * step + 2);
    bar.setAttribute("y", height - h);
    bar.setAttribute("width", Math.max(1, step - 4));
    bar.setAttribute("height", h);
    bar.setAttribute("data-window", w.window_start);
    bar.setAttribute("data-usage", String(w.usage));
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", pad + i * step + 2);
    label.setAttribute("y", height + 14);
    label.textContent = w.window_start.slice(5, 10);
    svg.append(bar, label);
  });
  return svg;
}

function usageTable(windows) {
  return table([["Window"], ["Usage", true]], windows.map((w) =>
    el("tr", { "data-window": w.window_start },
      el("td", {}, w.window_start),
      el("td", { class: "n", "data-usage": String(w.usage) }, String(w.usage)))));
}

const pages = {
  async health() {
    const s = await get("/v1/status");
    const files = s.files;
    const lagRows = s.lag.map((l) =>
      el("tr", { "data-lag": "", "data-stage": l.stage, "data-partition": l.partition },
        el("td", {}, l.stage), el("td", {}, l.topic), el("td", { class: "n" }, l.partition),
        el("td", { class: "n" }, l.position === null ? "-" : l.position),
        el("td", { class: "n" }, l.end), el("td", { class: "n", "data-value": l.lag }, l.lag)));
    const dead = Object.entries(s.dead_letters).map(([kind, n]) =>
      el("tr", { "data-dead-kind": kind }, el("td", {}, kind), el("td", { class: "n", "data-value": n }, n)));
    const rejected = s.rejected.map((r) =>
      el("tr", { "data-rejected": r.unit_id }, el("td", {}, r.path), el("td", {}, r.unit_id), el("td", {}, r.reason)));
    return [
      el("h1", {}, "Pipeline health"),
      s.needs_operator.length
        ? el("ul", { class: "bad", "data-figure": "needs-operator" }, s.needs_operator.map((line) => el("li", {}, line)))
        : el("p", { class: "good", "data-figure": "needs-operator" }, "Nothing needs an operator."),
      el("div", { class: "cards" },
        card("files announced", files.announced, "files-announced"),
        card("complete", files.complete, "files-complete"),
        card("in progress", files.in_progress, "files-in-progress"),
        card("rejected", files.rejected, "files-rejected", files.rejected ? "bad" : ""),
        card("last ingestion", s.last_ingestion || "never", "last-ingestion")),
      el("h2", {}, "Lag per stage and partition"),
      lagRows.length ? table([["Stage"], ["Topic"], ["Partition", true], ["Position", true], ["End", true], ["Lag", true]], lagRows)
        : el("p", { class: "note" }, "No stage has consumed yet."),
      el("h2", {}, "Rejected files"),
      rejected.length ? table([["File"], ["Unit"], ["Reason"]], rejected) : el("p", { class: "note" }, "None."),
      el("h2", {}, "Dead letters by kind"),
      dead.length ? table([["Kind"], ["Records", true]], dead) : el("p", { class: "note" }, "None."),
      s.partial.length ? el("p", { class: "note" }, "Partial: " + s.partial.join("; ")) : "",
    ];
  },

  async top() {
    const t = await get("/v1/top?limit=20");
    return [
      el("h1", {}, "Top consumers by running total"),
      table([["Consumer"], ["Total", true], ["Updated"]], t.consumers.map((c) =>
        el("tr", { "data-consumer": c.consumer_id },
          el("td", {}, el("a", { href: `#consumer/${c.consumer_id}` }, String(c.consumer_id))),
          el("td", { class: "n", "data-total": String(c.total) }, String(c.total)),
          el("td", {}, c.updated_at)))),
    ];
  },

  async usage() {
    const u = await get(`/v1/usage/total?${lastDays(7)}`);
    return [el("h1", {}, "Usage per day, all consumers (UTC)"), chart(u.usage), usageTable(u.usage)];
  },

  async consumer(id) {
    const c = await get(`/v1/consumers/${encodeURIComponent(id)}`);
    const parts = [
      el("h1", {}, `Consumer ${c.consumer_id}`),
      el("div", { class: "cards" },
        card("running total", String(c.total), "total"),
        card("updated", c.updated_at, "updated-at")),
    ];
    try {
      const u = await get(`/v1/consumers/${encodeURIComponent(id)}/usage?${lastDays(7)}`);
      parts.push(el("h2", {}, "Usage per day (UTC)"), chart(u.usage), usageTable(u.usage));
    } catch (error) {
      parts.push(el("p", { class: "note" }, `No usage per day: ${error.message}`));
    }
    return parts;
  },
};

async function show() {
  const [name, arg] = (location.hash.slice(1) || "health").split("/");
  const draw = pages[name] || pages.health;
  document.body.dataset.ready = "";
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("current", link.getAttribute("href") === `#${name}`);
  }
  try {
    page().replaceChildren(...(await draw(arg)));
    document.body.dataset.ready = name in pages ? name : "health";
  } catch (error) {
    page().replaceChildren(el("p", { class: "bad", "data-figure": "error" }, error.message));
    document.body.dataset.ready = "error";
  }
}

document.getElementById("find").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = document.getElementById("find-id").value.trim();
  if (id) location.hash = `consumer/${id}`;
});
window.addEventListener("hashchange", show);
show();
