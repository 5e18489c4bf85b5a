// facedata explore: the page. Every text from the run goes into the page as a text node or an
// attribute set through setAttribute: nothing from the run is ever parsed as HTML.
"use strict";

const TOKEN = document.querySelector('meta[name="explore-token"]').getAttribute("content");
const SVG_NS = "http://www.w3.org/2000/svg";
const PAGE_SIZE = 48;
let INFO = null;

// ------------------------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// A link to a web URL only when it is http(s); anything else (javascript:, data:) stays text.
function externalLink(url) {
  if (!url) return null;
  let parsed = null;
  try { parsed = new URL(url); } catch (e) { parsed = null; }
  if (parsed && (parsed.protocol === "http:" || parsed.protocol === "https:")) {
    return el("a", {href: parsed.href, rel: "noopener noreferrer nofollow", target: "_blank", class: "url"}, url);
  }
  return el("span", {class: "url"}, url);
}

async function getJSON(path) {
  const response = await fetch(path, {headers: {"Accept": "application/json"}});
  const body = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function fmt(n) { return Number(n).toLocaleString("en-US"); }
function pct(x) { return x === null || x === undefined ? "" : (100 * x).toFixed(0) + "%"; }

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  return {path, params: new URLSearchParams(query || "")};
}

function go(path, params) {
  const query = params && params.toString();
  location.hash = "#" + path + (query ? "?" + query : "");
}

function filtersOf(params) {
  const filters = {};
  for (const item of params.getAll("f")) {
    const i = item.indexOf(":");
    if (i > 0) (filters[item.slice(0, i)] ||= []).push(item.slice(i + 1));
  }
  return filters;
}

function apiQuery(params, extra) {
  const q = new URLSearchParams();
  for (const f of params.getAll("f")) q.append("f", f);
  if (params.get("q")) q.set("q", params.get("q"));
  for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
  return q.toString();
}

function main(...children) {
  const node = document.getElementById("main");
  node.replaceChildren(...children);
  return node;
}

// ----------------------------------------------------------------------------------- sample cards

function card(row, extra) {
  const href = "#/sample/" + encodeURIComponent(row.key);
  return el("div", {class: "card" + (row.identity_outlier ? " outlier" : ""), "data-testid": "card", "data-key": row.key},
    el("a", {href, class: "thumb-link"},
      el("img", {src: "/api/thumb/" + encodeURIComponent(row.key), alt: "", loading: "lazy", class: "thumb"})),
    el("div", {class: "meta"},
      el("a", {href, class: "key", "data-testid": "card-key"}, row.key),
      " ", el("span", {class: "status status-" + (row.status === "ok" ? "ok" : "dropped")}, row.status),
      row.reason_value ? el("div", {class: "reason-value", "data-testid": "reason-value"}, row.reason_value) : null,
      row.score !== null && row.score !== undefined ? el("div", {class: "small"}, "face score " + Number(row.score).toFixed(3)) : null,
      row.identity_outlier ? el("div", {class: "badge", "data-testid": "outlier"}, "outlier") : null,
      extra || null,
      el("div", {class: "caption", "data-testid": "web-caption"}, row.caption || ""),
      row.face_caption ? el("div", {class: "face-caption"}, row.face_caption) : null,
      externalLink(row.url) || (row.path ? el("div", {class: "url"}, row.path) : null)));
}

function pager(total, page, pageSize, onPage) {
  const pages = Math.max(1, Math.ceil(total / pageSize));
  return el("div", {class: "pager"},
    el("button", {disabled: page <= 0 ? "disabled" : null, onclick: () => onPage(page - 1), "data-testid": "prev"}, "‹ prev"),
    ` page ${page + 1} of ${fmt(pages)} `,
    el("button", {disabled: page + 1 >= pages ? "disabled" : null, onclick: () => onPage(page + 1), "data-testid": "next"}, "next ›"));
}

// ------------------------------------------------------------------------------------ funnel

function funnelChart(funnel, params) {
  const active = (filtersOf(params).status || [])[0];
  const rows = [];
  rows.push({label: "input", kept: funnel.total});
  for (const stage of funnel.stages) {
    for (const r of stage.reasons) rows.push({stage: stage.stage, reason: r.reason, count: r.count, hidden: r.hidden});
    rows.push({label: stage.stage + " → kept", kept: stage.kept});
  }
  const width = 720, rowH = 22, labelW = 250, barW = width - labelW - 80;
  const chart = svg("svg", {viewBox: `0 0 ${width} ${rows.length * rowH + 4}`, class: "funnel", "data-testid": "funnel",
                            role: "img", "aria-label": "funnel"});
  rows.forEach((row, i) => {
    const y = i * rowH + 2;
    const n = row.kept !== undefined ? row.kept : row.count;
    const w = Math.max(1, barW * n / Math.max(1, funnel.total));
    if (row.kept !== undefined) {
      chart.append(svg("text", {x: 4, y: y + 15, class: "flabel stage"}, row.label),
                   svg("rect", {x: labelW, y: y + 3, width: w, height: rowH - 6, class: "bar kept"}),
                   svg("text", {x: labelW + w + 6, y: y + 15, class: "fcount"}, fmt(n)));
      return;
    }
    const cls = "reason" + (row.hidden ? " hidden" : " clickable") + (active === row.reason ? " active" : "");
    const g = svg("g", {class: cls, "data-testid": "reason", "data-stage": row.stage, "data-reason": row.reason,
                        "data-count": row.count});
    // A transparent row behind the label and bar: the whole row takes the click.
    g.append(svg("rect", {x: 0, y, width, height: rowH, class: "hit"}));
    g.append(svg("text", {x: 20, y: y + 15, class: "flabel"}, `${row.stage} / ${row.reason}` + (row.hidden ? " (count only)" : "")),
             svg("rect", {x: labelW, y: y + 5, width: w, height: rowH - 10, class: "bar dropped"}),
             svg("text", {x: labelW + w + 6, y: y + 15, class: "fcount"}, fmt(row.count)));
    if (!row.hidden) {
      g.addEventListener("click", () => {
        const p = new URLSearchParams();
        p.append("f", "status:" + row.reason);
        go("/", p);
      });
    }
    chart.append(g);
  });
  return el("section", {class: "funnel-box"}, el("h2", {}, "Funnel"), el("p", {class: "small"},
    "Click a reason to see exactly those samples. Hidden statuses are counted, never shown."), chart);
}

// ------------------------------------------------------------------------------------ facets

function facetPanel(facets, params) {
  const filters = filtersOf(params);
  const panel = el("aside", {class: "facets", "data-testid": "facets"},
    el("h2", {}, "Facets"),
    el("div", {class: "small", "data-testid": "facet-total"}, fmt(facets.total) + " samples match"));
  for (const [facet, values] of Object.entries(facets.facets)) {
    if (!values.length || (values.length === 1 && values[0].value === "(none)" && !filters[facet])) continue;
    const box = el("div", {class: "facet", "data-facet": facet}, el("h3", {}, facet.replace(/_/g, " ")));
    for (const v of values) {
      const on = (filters[facet] || []).includes(v.value);
      const input = el("input", {type: "checkbox", checked: on ? "checked" : null});
      input.addEventListener("change", () => {
        const p = new URLSearchParams(params);
        const item = facet + ":" + v.value;
        const rest = p.getAll("f").filter(f => f !== item);
        p.delete("f");
        for (const f of rest) p.append("f", f);
        if (input.checked) p.append("f", item);
        p.delete("page");
        go("/", p);
      });
      box.append(el("label", {class: "facet-value", "data-testid": "facet-value", "data-facet": facet, "data-value": v.value,
                              "data-count": v.count},
        input, " ", el("span", {class: "value"}, v.value), " ", el("span", {class: "count"}, fmt(v.count))));
    }
    panel.append(box);
  }
  return panel;
}

// ------------------------------------------------------------------------------------ views

async function viewSamples(params) {
  const page = Number(params.get("page") || 0);
  const [funnel, facets, samples] = await Promise.all([
    getJSON("/api/funnel"), getJSON("/api/facets?" + apiQuery(params)),
    getJSON("/api/samples?" + apiQuery(params, {page, page_size: PAGE_SIZE}))]);
  const filters = filtersOf(params);
  const chips = el("div", {class: "chips"});
  for (const [facet, values] of Object.entries(filters)) {
    for (const value of values) {
      chips.append(el("button", {class: "chip", "data-testid": "chip", onclick: () => {
        const p = new URLSearchParams(params);
        const rest = p.getAll("f").filter(f => f !== facet + ":" + value);
        p.delete("f"); for (const f of rest) p.append("f", f); p.delete("page");
        go("/", p);
      }}, `${facet} = ${value} ✕`));
    }
  }
  if (params.get("q")) chips.append(el("span", {class: "chip", "data-testid": "query-chip"}, `text contains “${params.get("q")}”`));
  const header = el("div", {class: "results-head"},
    el("h2", {}, "Samples"),
    el("span", {"data-testid": "result-total"}, fmt(samples.total)), " shown",
    samples.hidden ? el("span", {class: "hidden-count", "data-testid": "hidden-count"}, ` · ${fmt(samples.hidden)} hidden (never shown)`) : null,
    chips);
  const grid = el("div", {class: "grid", "data-testid": "grid"}, samples.rows.map(r => card(r)));
  const pages = pager(samples.total, page, PAGE_SIZE, p => { const q = new URLSearchParams(params); q.set("page", p); go("/", q); });
  main(el("div", {class: "layout"}, facetPanel(facets, params),
    el("div", {class: "content"}, funnelChart(funnel, params), header, grid, pages)));
}

function drawFaces(sample, img) {
  const overlay = svg("svg", {viewBox: `0 0 ${sample.width} ${sample.height}`, class: "overlay", "data-testid": "overlay",
                              preserveAspectRatio: "none"});
  const stroke = Math.max(2, Math.round(Math.max(sample.width, sample.height) / 300));
  for (const face of sample.faces) {
    const [x1, y1, x2, y2] = face.bbox || [0, 0, 0, 0];
    overlay.append(svg("rect", {x: x1, y: y1, width: x2 - x1, height: y2 - y1, class: face.primary ? "box primary" : "box",
                                "stroke-width": stroke, "data-testid": "face-box"}));
    overlay.append(svg("text", {x: x1 + stroke, y: Math.max(y1 - stroke * 2, stroke * 8), class: "box-label",
                                "font-size": stroke * 8}, "face " + face.index));
    const kps = face.kps || [];
    for (let i = 0; i + 1 < kps.length; i += 2) {
      overlay.append(svg("circle", {cx: kps[i], cy: kps[i + 1], r: stroke * 1.5, class: "kp", "data-testid": "landmark"}));
    }
  }
  return el("div", {class: "figure"}, img, overlay);
}

function confirmDialog(text) {
  return new Promise(resolve => {
    const dialog = document.getElementById("dialog");
    document.getElementById("dialog-text").textContent = text;
    dialog.hidden = false;
    const done = answer => { dialog.hidden = true; yes.onclick = no.onclick = null; resolve(answer); };
    const yes = document.getElementById("dialog-yes"), no = document.getElementById("dialog-no");
    yes.onclick = () => done(true);
    no.onclick = () => done(false);
  });
}

async function optOut(body, what, resultNode) {
  if (!await confirmDialog(`Opt ${what} out? Their face embeddings are added to the opt-out gallery; ` +
                           "the next run removes every image that matches them.")) return;
  const response = await fetch("/api/optout", {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Explore-Token": TOKEN}, body: JSON.stringify(body)});
  const answer = await response.json().catch(() => ({error: response.statusText}));
  resultNode.textContent = response.ok
    ? `Opted out: ${answer.embeddings} embedding(s) written to ${answer.written}. ${answer.note}.`
    : "Opt-out failed: " + (answer.error || response.statusText);
  resultNode.className = response.ok ? "optout-result ok" : "optout-result error";
}

async function viewSample(key) {
  let sample;
  try { sample = await getJSON("/api/sample/" + encodeURIComponent(key)); }
  catch (err) { main(el("h2", {}, "Sample " + key), el("p", {class: "error", "data-testid": "error"}, err.message)); return; }
  const img = el("img", {src: "/api/image/" + encodeURIComponent(sample.key), alt: "", class: "full", "data-testid": "image"});
  const optoutResult = el("p", {class: "optout-result", "data-testid": "optout-result"});
  const faces = el("div", {class: "faces"});
  for (const face of sample.faces) {
    const table = el("table", {class: "attrs", "data-testid": "attributes"},
      el("tr", {}, el("th", {}, "attribute"), el("th", {}, "value"), el("th", {}, "confidence")));
    for (const a of face.attributes || []) {
      if (a.confidence === null && a.value === null) continue;
      table.append(el("tr", {class: a.value === null ? "unstated" : ""}, el("td", {}, a.name),
        el("td", {}, a.value === null ? "not stated" : String(a.value)), el("td", {}, pct(a.confidence))));
    }
    faces.append(el("section", {class: "face", "data-testid": "face"},
      el("h3", {}, `face ${face.index}` + (face.primary ? " (primary)" : "")),
      el("p", {class: "small"}, `detector score ${Number(face.score).toFixed(3)} · yaw ${Number(face.yaw).toFixed(0)}° · ` +
        `sharpness ${Number(face.sharpness).toFixed(0)}`,
        face.identity_id !== null ? [" · identity ", el("a", {href: "#/identity/" + face.identity_id}, String(face.identity_id))] : null),
      face.attributes ? table : el("p", {class: "small"}, "no attributes (not described)"),
      face.embedded && sample.optout_possible ? el("button", {"data-testid": "optout-face",
        onclick: () => optOut({key: sample.key, face: face.index}, "this face", optoutResult)}, "Opt this face out") : null));
  }
  const stages = el("table", {class: "stages", "data-testid": "stages"});
  for (const s of sample.stages) {
    stages.append(el("tr", {}, el("td", {}, s.stage),
      el("td", {class: s.status === "ok" ? "status-ok" : (s.status === "not reached" ? "small" : "status-dropped")}, s.status)));
  }
  const identity = sample.identity_id !== null
    ? el("a", {href: "#/identity/" + sample.identity_id, "data-testid": "identity-link"}, "identity " + sample.identity_id) : "none";
  main(el("div", {class: "sample"},
    el("div", {class: "sample-image"}, sample.has_image ? drawFaces(sample, img) : el("p", {}, "no stored image (dropped before it was stored)")),
    el("div", {class: "sample-info"},
      el("h2", {"data-testid": "sample-key"}, "Sample " + sample.key),
      el("dl", {},
        el("dt", {}, "status"), el("dd", {"data-testid": "sample-status"}, sample.status + (sample.reason_value ? " · " + sample.reason_value : "")),
        el("dt", {}, "web caption"), el("dd", {"data-testid": "sample-caption"}, sample.caption || ""),
        el("dt", {}, "face caption"), el("dd", {"data-testid": "sample-face-caption"}, sample.face_caption || "(none)"),
        el("dt", {}, "URL"), el("dd", {}, externalLink(sample.url) || sample.path || ""),
        el("dt", {}, "licence"), el("dd", {}, sample.license || "not given"),
        el("dt", {}, "identity"), el("dd", {}, identity, sample.identity_outlier ? " (outlier)" : ""),
        el("dt", {}, "split"), el("dd", {"data-testid": "sample-split"}, sample.split || "none"),
        sample.error ? [el("dt", {}, "detail"), el("dd", {}, sample.error)] : null),
      el("h3", {}, "Status at each stage"), stages,
      INFO && INFO.face_search ? el("p", {}, el("a", {href: "#/similar/" + encodeURIComponent(sample.key), "data-testid": "more-like-this"}, "More like this")) : null,
      sample.identity_id !== null && sample.optout_possible ? el("button", {"data-testid": "optout-identity",
        onclick: () => optOut({identity_id: sample.identity_id}, `identity ${sample.identity_id} (every image of this person)`, optoutResult)},
        "Opt this person out") : null,
      optoutResult, faces)));
}

async function viewIdentities(params) {
  const page = Number(params.get("page") || 0);
  const data = await getJSON("/api/identities?page=" + page + "&page_size=60");
  const grid = el("div", {class: "grid", "data-testid": "identity-grid"});
  for (const row of data.rows) {
    grid.append(el("div", {class: "card", "data-testid": "identity-card"},
      row.cover ? el("a", {href: "#/identity/" + row.identity_id},
        el("img", {src: "/api/thumb/" + encodeURIComponent(row.cover), alt: "", class: "thumb", loading: "lazy"})) : null,
      el("div", {class: "meta"}, el("a", {href: "#/identity/" + row.identity_id}, "identity " + row.identity_id),
        el("div", {class: "small"}, `${fmt(row.n)} images · ${row.outliers} outliers · ${row.split || "no split"}`))));
  }
  const files = (INFO.files || []).map(f => el("p", {}, el("a", {href: "/files/" + f}, f)));
  main(el("h2", {}, `Identities (${fmt(data.total)})`), el("p", {class: "small"}, "Largest first; click one to see its faces."),
    grid, pager(data.total, page, 60, p => go("/identities", new URLSearchParams({page: p}))), ...files);
}

async function viewIdentity(id) {
  const data = await getJSON("/api/identity/" + encodeURIComponent(id));
  const optoutResult = el("p", {class: "optout-result", "data-testid": "optout-result"});
  const section = (title, rows, testid) => rows.length
    ? [el("h3", {}, `${title} (${rows.length})`), el("div", {class: "grid", "data-testid": testid}, rows.map(r => card(r,
        r.identity_centre_sim !== null ? el("div", {class: "small"}, "similarity to centre " + Number(r.identity_centre_sim).toFixed(3)) : null)))]
    : [];
  main(el("h2", {"data-testid": "identity-title"}, `Identity ${data.identity_id}`),
    el("p", {}, `${fmt(data.n)} images with this primary face` + (data.hidden ? ` (${data.hidden} hidden)` : "")),
    INFO.optout_gallery ? el("button", {"data-testid": "optout-identity",
      onclick: () => optOut({identity_id: data.identity_id}, `identity ${data.identity_id} (every image of this person)`, optoutResult)},
      "Opt this person out") : null,
    optoutResult,
    ...section("Faces (outliers marked)", data.members, "members"),
    ...section("Near-duplicates it absorbed", data.near_duplicates, "near-duplicates"),
    ...section("Also seen as another face in", data.other_faces, "other-faces"));
}

async function viewFaceSearch(params) {
  const q = params.get("q") || "";
  const data = await getJSON("/api/face_search?q=" + encodeURIComponent(q));
  main(el("h2", {}, "Faces for “", q, "”"), el("p", {class: "small"}, "FLIP text-to-face search, best first (cosine)."),
    el("div", {class: "grid", "data-testid": "face-search-results"}, data.rows.map(r => card(r,
      el("div", {class: "small", "data-testid": "similarity"}, "cosine " + Number(r.similarity).toFixed(3))))));
}

async function viewSimilar(key) {
  const data = await getJSON("/api/similar/" + encodeURIComponent(key));
  main(el("h2", {}, "More like ", el("a", {href: "#/sample/" + encodeURIComponent(key)}, key)),
    el("div", {class: "grid", "data-testid": "similar-results"}, data.rows.map(r => card(r,
      el("div", {class: "small"}, "cosine " + Number(r.similarity).toFixed(3))))));
}

async function render() {
  const {path, params} = route();
  document.getElementById("search").value = path === "/" ? (params.get("q") || "") : "";
  try {
    if (path === "/" || path === "") await viewSamples(params);
    else if (path.startsWith("/sample/")) await viewSample(decodeURIComponent(path.slice(8)));
    else if (path === "/identities") await viewIdentities(params);
    else if (path.startsWith("/identity/")) await viewIdentity(decodeURIComponent(path.slice(10)));
    else if (path === "/face-search") await viewFaceSearch(params);
    else if (path.startsWith("/similar/")) await viewSimilar(decodeURIComponent(path.slice(9)));
    else main(el("p", {}, "No such page."));
  } catch (err) {
    main(el("p", {class: "error", "data-testid": "error"}, "Error: " + err.message));
  }
  document.body.setAttribute("data-ready", String(Date.now()));
}

async function start() {
  INFO = await getJSON("/api/info");
  document.getElementById("run-name").textContent = INFO.run;
  document.getElementById("search-form").addEventListener("submit", event => {
    event.preventDefault();
    const {path, params} = route();
    const p = path === "/" ? new URLSearchParams(params) : new URLSearchParams();
    const text = document.getElementById("search").value.trim();
    if (text) p.set("q", text); else p.delete("q");
    p.delete("page");
    go("/", p);
  });
  if (INFO.face_search) {
    const form = document.getElementById("face-search-form");
    form.hidden = false;
    form.addEventListener("submit", event => {
      event.preventDefault();
      go("/face-search", new URLSearchParams({q: document.getElementById("face-search").value.trim()}));
    });
  }
  window.addEventListener("hashchange", render);
  await render();
}

start();
