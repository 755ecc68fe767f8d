// The page of `fusion serve`: pick a user (or type a new user's history) and see their history, rationale
// and recommendations with the evidence linking each item to the rationale. Everything shown comes from
// the service's JSON API and is written as text (never as HTML). ?user=ID&k=N opens a user directly.
"use strict";

const $ = (id) => document.getElementById(id);

// The token travels in the fragment (#token=), which the browser never sends; it is kept in this tab
// and never put in a query string. One given as ?token= has already gone to the server (which refuses
// it and logs it redacted): it is dropped from the address, not used, and the user is told.
const SECRET_PARAM = /token|key|secret|passw|pwd|auth|credential|signature|session/i;  // as service.py's
const search = new URLSearchParams(location.search);
const secretInAddress = [...new Set(search.keys())].filter((name) => SECRET_PARAM.test(name));
for (const name of secretInAddress) search.delete(name);
const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
if (hashToken) sessionStorage.setItem("token", hashToken);
if (hashToken || secretInAddress.length) {  // keep the token out of the address
  const rest = search.toString();
  history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : ""));
}
$("token").value = sessionStorage.getItem("token") || "";
$("token").addEventListener("change", () => sessionStorage.setItem("token", $("token").value));

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const token = $("token").value;
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401) $("auth").open = true;
    throw new Error(body.error || `${response.status} ${response.statusText}`);
  }
  return body;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

const label = (item) => (item.year ? `${item.title} (${item.year})` : item.title);

function renderRationale(r) {
  const dl = $("rationale");
  dl.replaceChildren();
  $("rationale-by").textContent = r ? `(written by ${r.model})` : "";
  if (!r) {
    dl.append(el("dd", "No rationale was written for this user.", "none"));
  } else if (r.error) {
    dl.append(el("dt", "Answer"), el("dd", r.text || ""), el("dt", "Note"), el("dd", `off-format: ${r.error}`, "none"));
  } else {
    for (const i of [1, 2, 3]) dl.append(el("dt", `Step ${i}`), el("dd", r[`step${i}`]));
  }
}

function renderRecommendations(recs) {
  const rows = recs.map((x) => {
    const tr = el("tr");
    const item = el("td", label(x));
    item.title = `item ${x.id}; categories: ${x.categories.join(", ")}`;
    const categories = el("td");
    if (x.evidence.categories.length) {
      for (const c of x.evidence.categories) categories.append(el("span", c, "chip"));
    } else categories.append(el("span", "–", "none"));
    const named = el("td");
    named.append(x.evidence.title ? el("span", x.evidence.title, "quote") : el("span", "–", "none"));
    const cosine = el("td");
    if (x.evidence.cosine === null) cosine.append(el("span", "–", "none"));
    else {
      const bar = el("span", null, "bar");
      bar.style.width = `${Math.max(0, x.evidence.cosine) * 6}rem`;
      cosine.append(bar, x.evidence.cosine.toFixed(3));
    }
    tr.append(el("td", x.rank, "num"), item, el("td", x.score.toFixed(3), "num"), categories, named, cosine);
    return tr;
  });
  document.querySelector("#recs tbody").replaceChildren(...rows);
}

function render(answer) {
  $("title").textContent = answer.user === null
    ? `A new user with ${answer.history_length} items, by ${answer.model}`
    : `User ${answer.user}: ${answer.history_length} items, by ${answer.model}`;
  $("history").replaceChildren(...answer.history.map((item) => el("li", label(item))));
  renderRationale(answer.rationale);
  renderRecommendations(answer.recommendations);
  $("result").hidden = false;
}

async function show(load) {
  document.body.dataset.state = "loading";
  $("error").hidden = true;
  try {
    render(await load());
    document.body.dataset.state = "ready";
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
    document.body.dataset.state = "error";
  }
}

const k = () => Number($("k").value) || 10;

function showUser(user) {
  const params = new URLSearchParams({ user, k: k() });
  history.replaceState(null, "", `?${params}`);
  return show(() => api(`/users/${encodeURIComponent(user)}/recommendations?k=${k()}`));
}

$("pick").addEventListener("submit", (event) => {
  event.preventDefault();
  showUser($("user").value.trim());
});

$("new").addEventListener("submit", (event) => {
  event.preventDefault();
  const items = $("items").value.split(/[\s,;]+/).filter(Boolean);
  show(() => api("/recommendations", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ history: items, k: k() }),
  }));
});

async function start() {
  const ready = await fetch("/ready").then((r) => r.json()).catch(() => null);
  $("about").textContent = ready
    ? `Model ${ready.model}: ${ready.users} users, ${ready.items} items (${ready.index} search)` +
      (ready.new_users ? "." : "; new users are off (no SLIM student endpoint).")
    : "The service does not answer.";
  if (ready && !ready.new_users) $("new-user").hidden = true;
  if (secretInAddress.length) {
    $("notice").textContent = `Not used: ${secretInAddress.join(", ")} came in the address after "?", which is ` +
      'sent to the server. Give the token after "#" (#token=...) or in the Access token box.';
    $("notice").hidden = false;
    $("auth").open = true;
  }
  const params = search;
  if (params.get("k")) $("k").value = params.get("k");
  api("/users?limit=1000")
    .then((body) => $("users").replaceChildren(...body.users.map((u) => { const o = el("option"); o.value = u; return o; })))
    .catch(() => {});  // without the token the list stays empty; typing an id still works
  if (params.get("user")) {
    $("user").value = params.get("user");
    await showUser(params.get("user"));
  }
}

start();
