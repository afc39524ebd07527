// The Conveyor dashboard: polls the gateway's /dashboard/api routes and draws what they say.
//
// The gateway's token (CONVEYOR_GATEWAY_TOKEN), when it asks for one, is sent as an
// Authorization header with every request. It comes from the address's fragment
// (/dashboard#token=...: a fragment never reaches the server or its logs; it is then removed
// from the address bar) or from the form the page shows on a 401, and is kept in this tab's
// sessionStorage only.
"use strict";

const TOKEN_KEY = "conveyor.gateway.token";
const FINISHED = new Set(["completed", "failed", "cancelled"]);
const PAUSABLE = new Set(["queued", "running", "retrying"]);
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

let openTask = null; // {id, seen: the last event index shown}
let tasksAsked = 0; // answers to older task-list requests are dropped

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Talking to the gateway

function takeTokenFromAddress() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(`dashboard/api/${path}`, { ...options, headers });
  const body = await response.json().catch(() => null);
  if (response.status === 401) {
    askForToken(token ? "the gateway refused this token" : "");
    throw new ApiError(401, "the gateway wants its token");
  }
  if (!response.ok) {
    throw new ApiError(response.status, describe(body && body.detail) || response.statusText);
  }
  $("token-form").hidden = true;
  return body;
}

function describe(detail) {
  if (!Array.isArray(detail)) return detail;
  return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
}

function askForToken(problem) {
  $("token-form").hidden = false;
  $("token-problem").textContent = problem;
}

function every(milliseconds, refresh) {
  const tick = async () => {
    try {
      await refresh();
      $("connection").textContent = `updated ${clock(new Date())}`;
      $("connection").classList.remove("problem");
    } catch (error) {
      $("connection").textContent = `gateway: ${error.message}`;
      $("connection").classList.add("problem");
    }
    setTimeout(tick, milliseconds);
  };
  tick();
}

// Drawing

function clock(moment, withMilliseconds = false) {
  if (!moment) return "";
  const at = moment instanceof Date ? moment : new Date(moment);
  const two = (n) => String(n).padStart(2, "0");
  const text = `${two(at.getHours())}:${two(at.getMinutes())}:${two(at.getSeconds())}`;
  return withMilliseconds ? `${text}.${String(at.getMilliseconds()).padStart(3, "0")}` : text;
}

function cell(content, className) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content);
  else td.textContent = content === null || content === undefined ? "" : String(content);
  if (className) td.className = className;
  return td;
}

function badge(status) {
  const span = document.createElement("span");
  span.className = `status ${status}`;
  span.textContent = status;
  return span;
}

function emptyRow(columns, text) {
  const tr = document.createElement("tr");
  const td = cell(text, "empty");
  td.colSpan = columns;
  tr.append(td);
  return tr;
}

function instancesOf(service) {
  const list = document.createElement("div");
  const alive = [...service.instances].sort((a, b) => b.alive - a.alive);
  for (const instance of alive) {
    const line = document.createElement("div");
    line.className = `instance ${instance.alive ? "alive" : "gone"}`;
    const where = `${instance.host || "?"} pid ${instance.pid ?? "?"}`;
    line.textContent = instance.alive
      ? `${where}: alive, running ${instance.running}`
      : `${where}: not alive`;
    list.append(line);
  }
  return list;
}

async function refreshServices() {
  const { services } = await api("services");
  const rows = services.map((service) => {
    const tr = document.createElement("tr");
    tr.dataset.service = service.name;
    const count = (status) => cell(service.pending[status] || 0, "number");
    tr.append(cell(service.name), cell(instancesOf(service)), count("queued"),
      count("running"), count("retrying"), count("paused"));
    return tr;
  });
  $("services").tBodies[0].replaceChildren(
    ...(rows.length ? rows : [emptyRow(6, "no service has registered yet")]));
}

async function refreshTasks() {
  const query = new URLSearchParams();
  const status = $("status-filter").value;
  const search = $("search").value.trim();
  if (status) query.set("status", status);
  if (search) query.set("q", search);
  const asked = ++tasksAsked;
  const { tasks } = await api(`tasks?${query}`);
  if (asked !== tasksAsked) return;
  const rows = tasks.map((task) => {
    const tr = document.createElement("tr");
    tr.dataset.taskId = task.task_id;
    tr.tabIndex = 0;
    tr.classList.toggle("selected", openTask !== null && openTask.id === task.task_id);
    tr.append(cell(task.task_id, "id"), cell(task.service), cell(badge(task.status)),
      cell(clock(task.created_at)), cell(clock(task.finished_at)),
      cell(task.attempts, "number"));
    tr.addEventListener("click", () => openPanel(task.task_id));
    tr.addEventListener("keydown", (event) => event.key === "Enter" && openPanel(task.task_id));
    return tr;
  });
  $("tasks").tBodies[0].replaceChildren(
    ...(rows.length ? rows : [emptyRow(6, "no task matches")]));
}

function openPanel(taskId) {
  openTask = { id: taskId, seen: -1 };
  $("task-panel").hidden = false;
  $("task-id").textContent = taskId;
  $("action-result").textContent = "";
  $("timeline").tBodies[0].replaceChildren();
  for (const tr of $("tasks").tBodies[0].rows) {
    tr.classList.toggle("selected", tr.dataset.taskId === taskId);
  }
  refreshTask().catch(() => {}); // the next tick reports a problem
}

async function refreshTask() {
  const task = openTask;
  if (task === null) return;
  const detail = await api(`tasks/${encodeURIComponent(task.id)}?after=${task.seen}`);
  if (task !== openTask) return; // another task was opened meanwhile
  const body = $("timeline").tBodies[0];
  for (const event of detail.timeline) {
    if (event.index <= task.seen) continue; // an overlapping answer brought it already
    const tr = document.createElement("tr");
    tr.append(cell(event.index, "number"), cell(event.type), cell(clock(event.at, true)),
      cell(JSON.stringify(event.value)));
    body.append(tr);
    task.seen = event.index;
  }
  const status = $("task-status");
  status.textContent = detail.status;
  status.className = `status ${detail.status}`;
  $("task-service").textContent = detail.service;
  $("task-attempts").textContent = detail.attempts;
  $("task-created").textContent = clock(detail.created_at, true);
  $("task-finished").textContent = clock(detail.finished_at, true);
  $("task-error").textContent = detail.error || "";
  $("timeline-end").textContent = FINISHED.has(detail.status)
    ? `${detail.status} at ${clock(detail.finished_at, true)}`
    : body.rows.length ? "" : "no events yet";
  const link = $("trace-link");
  link.hidden = !detail.trace_url;
  if (detail.trace_url) link.href = detail.trace_url;
  $("no-trace").textContent = detail.trace_url ? ""
    : detail.trace_id ? "set CONVEYOR_JAEGER_UI_URL to link it" : "not traced";
  $("cancel").disabled = FINISHED.has(detail.status);
  $("pause").disabled = !PAUSABLE.has(detail.status);
  $("resume").disabled = detail.status !== "paused";
}

async function steer(action) {
  const task = openTask;
  if (task === null) return;
  $("action-result").textContent = `${action}…`;
  try {
    const answer = await api(`tasks/${encodeURIComponent(task.id)}/${action}`,
      { method: "POST" });
    $("action-result").textContent = answer.detail;
  } catch (error) {
    $("action-result").textContent = `${action} failed: ${error.message}`;
  }
  await Promise.allSettled([refreshTask(), refreshTasks()]);
}

function svg(name, attributes = {}) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

async function refreshThroughput() {
  const answer = await api("throughput?minutes=60");
  for (const status of ["completed", "failed", "cancelled"]) {
    $(`${status}-total`).textContent = answer[status];
  }
  const width = 600, height = 110, axis = 14;
  const slot = width / answer.minutes.length;
  const most = Math.max(1, ...answer.minutes.map((m) => m.completed + m.failed + m.cancelled));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + axis}`, role: "img",
    "aria-label": "tasks completed, failed and cancelled per minute over the last hour" });
  answer.minutes.forEach((minute, n) => {
    const column = svg("g");
    const title = svg("title");
    title.textContent = `${clock(minute.minute).slice(0, 5)}: ${minute.completed} completed, ` +
      `${minute.failed} failed, ${minute.cancelled} cancelled`;
    column.append(title, svg("rect", { class: "column", x: n * slot, y: 0, width: slot,
      height }));
    let top = height;
    for (const status of ["completed", "failed", "cancelled"]) {
      if (!minute[status]) continue;
      const tall = (minute[status] / most) * height;
      top -= tall;
      column.append(svg("rect", { class: status, x: n * slot + 1, y: top,
        width: Math.max(slot - 2, 1), height: tall }));
    }
    chart.append(column);
  });
  const label = (x, text, anchor) => {
    const element = svg("text", { x, y: height + axis - 2, "text-anchor": anchor });
    element.textContent = text;
    return element;
  };
  const peak = svg("text", { x: 2, y: 10 });
  peak.textContent = `${most} per minute`;
  chart.append(svg("line", { x1: 0, x2: width, y1: height, y2: height, stroke: "#d8dde6" }),
    label(0, "an hour ago", "start"), label(width, "now", "end"), peak);
  $("throughput-chart").replaceChildren(chart);
}

// Wiring

function start() {
  takeTokenFromAddress();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("token-problem").textContent = "checking…";
    Promise.allSettled([refreshServices(), refreshTasks(), refreshThroughput()]);
  });
  let typing = null;
  $("search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => refreshTasks().catch(() => {}), 250);
  });
  $("status-filter").addEventListener("change", () => refreshTasks().catch(() => {}));
  for (const action of ["cancel", "pause", "resume"]) {
    $(action).addEventListener("click", () => steer(action));
  }
  every(2000, refreshServices);
  every(2000, refreshTasks);
  every(5000, refreshThroughput);
  every(1000, refreshTask);
}

start();
