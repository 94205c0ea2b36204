// The operator console. Plain JavaScript, no build step; charts by Chart.js (vendored).
// Every figure comes from the service's documented JSON API, with the consumer token the page
// asks for once and keeps in sessionStorage (this tab only).
"use strict";

const API = "/api/v1/bucket/prana";
const REFRESH_MS = 5000;
const TOKEN_KEY = "prana-bucket-token";
const STATE_COLOURS = {
  DEEP_FOCUS: "#1570ef", ON_TASK: "#12b76a", THINKING: "#7a5af8", IDLE: "#fdb022",
  DISTRACTED: "#f79009", AWAY: "#98a2b3", OFF_TASK: "#f04438", WORKING: "#12b76a",
  FAKING: "#b42318",
};
const DELIVERY_COLOURS = {
  processed: "#067647", pending: "#98a2b3", leased: "#1570ef", dead: "#b42318",
};
const charts = {};
let refreshTimer = null;

// --- the API and the token -------------------------------------------------------------

class Unauthorised extends Error {}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    ...options, headers, body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (response.status === 401 || response.status === 403) {
    throw new Unauthorised((await response.json()).message);
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.message || `${response.status}`);
  return { body, response };
}

function askForToken(message) {
  stopRefreshing();
  document.getElementById("console").hidden = true;
  const error = document.getElementById("token-error");
  error.hidden = !message;
  error.textContent = message || "";
  const dialog = document.getElementById("token-dialog");
  if (!dialog.open) dialog.showModal();
  document.getElementById("token-input").focus();
}

document.getElementById("token-form").addEventListener("submit", () => {
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
  start();
});

document.getElementById("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  askForToken("");
});

// --- live figures ----------------------------------------------------------------------

function setFigure(id, value) {
  const element = document.getElementById(id);
  element.textContent = typeof value === "number" ? value.toLocaleString("en") : value;
  element.dataset.value = String(value);
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "none";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

async function refreshFigures() {
  const { body: status } = await api(`${API}/status`);
  setFigure("fig-pending", status.pending_packets);
  setFigure("fig-ready", status.queue_size);
  setFigure("fig-leased", status.leased_packets);
  setFigure("fig-retrying", status.retrying_packets);
  setFigure("fig-processed", status.processed_packets);
  setFigure("fig-dead", status.dead_packets);
  document.getElementById("fig-dead").parentElement.classList.toggle("bad", status.dead_packets > 0);
  setFigure("fig-quarantined", status.quarantined_packets);
  setFigure("fig-oldest", age(status.oldest_pending_age_seconds));
  setFigure("fig-backend", `${status.queue_backend}${status.redis_connected ? "" : " (no Redis)"}`);
  const ready = await fetch("/health/ready").then((r) => r.json()).catch(() => ({}));
  setFigure("fig-database", ready.database ? "up" : "down");
  const pill = document.getElementById("health");
  pill.textContent = ready.database ? "ready" : "not ready";
  pill.className = `pill ${ready.database ? "ok" : "bad"}`;
}

// --- charts ----------------------------------------------------------------------------

function minuteLabel(iso, withDay) {
  const moment = new Date(iso);
  const time = moment.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
  return withDay ? `${moment.toLocaleDateString("en-GB", { weekday: "short" })} ${time}` : time;
}

function drawOrUpdate(id, config) {
  if (charts[id]) {
    charts[id].data = config.data;
    charts[id].update("none");
  } else {
    charts[id] = new Chart(document.getElementById(id), config);
  }
}

function activityChart(series, withDay) {
  return {
    type: "line",
    data: {
      labels: series.minutes.map((m) => minuteLabel(m, withDay)),
      datasets: [
        { label: "ingested", data: series.ingested, borderColor: "#1570ef",
          backgroundColor: "#1570ef", pointRadius: 0,
          borderWidth: 1.5, tension: 0.2 },
        { label: "processed", data: series.processed, borderColor: "#067647",
          backgroundColor: "#067647", pointRadius: 0,
          borderWidth: 1.5, tension: 0.2 },
      ],
    },
    options: { animation: false, interaction: { mode: "index", intersect: false },
               scales: { x: { ticks: { maxTicksLimit: 8 } }, y: { beginAtZero: true } } },
  };
}

function mixChart(series) {
  const systems = Object.keys(series.states).sort();
  const states = [...new Set(systems.flatMap((s) => Object.keys(series.states[s])))].sort();
  return {
    type: "bar",
    data: {
      labels: systems,
      datasets: states.map((state) => ({
        label: state,
        data: systems.map((system) => series.states[system][state] || 0),
        backgroundColor: STATE_COLOURS[state] || "#475467",
      })),
    },
    options: { animation: false, indexAxis: "y",
               scales: { x: { stacked: true, beginAtZero: true }, y: { stacked: true } } },
  };
}

const REFUSAL_COLOURS = { missing: "#b54708", invalid: "#b42318", mismatch: "#6941c6" };

function authChart(series) {
  const reasons = Object.keys(series.refused || {}).sort();
  return {
    data: {
      labels: series.minutes.map((m) => minuteLabel(m, false)),
      datasets: [
        { type: "line", label: "verified %", yAxisID: "share", pointRadius: 0,
          borderColor: "#067647", backgroundColor: "#067647", borderWidth: 1.5, spanGaps: false,
          data: (series.verified_share || []).map((v) => (v === null ? null : v * 100)) },
        ...reasons.map((reason) => ({
          type: "bar", label: `refused: ${reason}`, yAxisID: "count", stack: "refused",
          backgroundColor: REFUSAL_COLOURS[reason] || "#475467", data: series.refused[reason],
        })),
      ],
    },
    options: { animation: false, interaction: { mode: "index", intersect: false },
               scales: { x: { stacked: true, ticks: { maxTicksLimit: 8 } },
                         share: { position: "left", min: 0, max: 100 },
                         count: { position: "right", stacked: true, beginAtZero: true,
                                  grid: { drawOnChartArea: false } } } },
  };
}

async function refreshCharts() {
  const [{ body: hour }, { body: day }] = await Promise.all([
    api(`${API}/stats/timeseries?window=1h`), api(`${API}/stats/timeseries?window=24h`),
  ]);
  drawOrUpdate("chart-1h", activityChart(hour, false));
  drawOrUpdate("chart-24h", activityChart(day, true));
  drawOrUpdate("chart-mix", mixChart(day));
  drawOrUpdate("chart-auth", authChart(hour));
}

// --- dead letters ----------------------------------------------------------------------

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

async function requeue(body, question) {
  if (!window.confirm(question)) return;
  const { body: result } = await api(`${API}/packets/dead/requeue`, { method: "POST", body });
  document.getElementById("dead-message").textContent = `requeued ${result.requeued}`;
  await refresh();
}

async function refreshDead() {
  const { body: dead } = await api(`${API}/packets/dead?limit=50`);
  const tbody = document.querySelector("#dead-table tbody");
  tbody.replaceChildren();
  for (const packet of dead) {
    const row = tbody.insertRow();
    row.dataset.packetId = packet.packet_id;
    cell(row, new Date(packet.dead_at || packet.received_at).toLocaleString("en-GB"));
    cell(row, packet.packet_id);
    cell(row, packet.user_id);
    cell(row, String(packet.delivery_count));
    cell(row, packet.last_error || "", "error-text").title = packet.last_error || "";
    const actions = row.insertCell();
    const one = document.createElement("button");
    one.textContent = "Requeue";
    one.className = "requeue-one";
    one.addEventListener("click", () => requeue(
      { packet_ids: [packet.packet_id] }, `Requeue packet ${packet.packet_id}?`));
    const user = document.createElement("button");
    user.textContent = "Requeue user's";
    user.addEventListener("click", () => requeue(
      { user_id: packet.user_id }, `Requeue every dead packet of ${packet.user_id}?`));
    actions.append(one, " ", user);
  }
  if (!dead.length) {
    const row = tbody.insertRow();
    cell(row, "No dead letters.").colSpan = 6;
  }
}

document.getElementById("requeue-all").addEventListener("click", () => requeue(
  { all: true }, "Requeue every dead packet?"));

// --- a learner's timeline --------------------------------------------------------------

function localInput(date) {
  const shifted = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return shifted.toISOString().slice(0, 16);
}

async function showTimeline(event) {
  if (event) event.preventDefault();
  const user = document.getElementById("timeline-user").value.trim();
  const since = document.getElementById("timeline-since").value;
  const until = document.getElementById("timeline-until").value;
  const query = new URLSearchParams({ limit: "500" });
  if (since) query.set("since", new Date(since).toISOString());
  if (until) query.set("until", new Date(until).toISOString());
  const { body: newestFirst } = await api(
    `${API}/packets/user/${encodeURIComponent(user)}?${query}`);
  // The chart follows the learner's own clock (each packet's 5-second window): a packet kept
  // in the browser's offline queue arrives late but belongs where it happened.
  const packets = newestFirst.slice().sort(
    (a, b) => new Date(a.client_timestamp) - new Date(b.client_timestamp));
  document.getElementById("timeline-message").textContent =
    `${packets.length} packets${packets.length === 500 ? " (the newest 500)" : ""}`;
  document.getElementById("timeline-figure").hidden = !packets.length;
  document.getElementById("timeline-table").hidden = !packets.length;
  const labels = packets.map((p) => new Date(p.client_timestamp).toLocaleTimeString("en-GB"));
  const state = (p) => p.cognitive_state || p.state || "unknown";
  drawOrUpdate("chart-timeline", {
    data: {
      labels,
      datasets: [
        { type: "line", label: "focus score", data: packets.map((p) => p.focus_score),
          borderColor: "#1d2330", borderWidth: 1.5, yAxisID: "y",
          pointBackgroundColor: packets.map((p) => DELIVERY_COLOURS[p.delivery_state]),
          pointRadius: 3 },
        { type: "bar", label: "cognitive state", data: packets.map(() => 1), yAxisID: "band",
          backgroundColor: packets.map((p) => `${STATE_COLOURS[state(p)] || "#475467"}55`),
          barPercentage: 1, categoryPercentage: 1 },
      ],
    },
    options: {
      animation: false,
      plugins: { legend: { display: false }, tooltip: { callbacks: {
        afterLabel: (item) => `${state(packets[item.dataIndex])}, ${packets[item.dataIndex].delivery_state}`,
      } } },
      scales: { y: { min: 0, max: 100, title: { display: true, text: "focus" } },
                band: { display: false, min: 0, max: 1 },
                x: { ticks: { maxTicksLimit: 12 } } },
      onClick: (_, elements) => { if (elements.length) showPacket(packets[elements[0].index]); },
    },
  });
  const legend = document.getElementById("timeline-legend");
  legend.replaceChildren();
  for (const name of [...new Set(packets.map(state))]) {
    const swatch = document.createElement("span");
    swatch.textContent = name;
    swatch.style.setProperty("--swatch", STATE_COLOURS[name] || "#475467");
    legend.append(swatch);
  }
  const tbody = document.querySelector("#timeline-table tbody");
  tbody.replaceChildren();
  for (const packet of newestFirst) {
    const row = tbody.insertRow();
    row.className = "clickable";
    row.dataset.packetId = packet.packet_id;
    row.dataset.delivery = packet.delivery_state;
    cell(row, new Date(packet.client_timestamp).toLocaleString("en-GB"));
    cell(row, new Date(packet.received_at).toLocaleTimeString("en-GB"));
    cell(row, state(packet));
    cell(row, packet.focus_score === null ? "–" : String(packet.focus_score));
    cell(row, packet.delivery_state).style.color = DELIVERY_COLOURS[packet.delivery_state];
    cell(row, packet.packet_id);
    row.addEventListener("click", () => showPacket(packet));
  }
}

function showPacket(packet) {
  const detail = document.getElementById("packet-detail");
  detail.hidden = false;
  detail.textContent = JSON.stringify(packet, null, 2);
}

document.getElementById("timeline-form").addEventListener("submit", showTimeline);

// --- start and refresh -----------------------------------------------------------------

async function refresh() {
  try {
    await Promise.all([refreshFigures(), refreshCharts(), refreshDead()]);
    document.getElementById("updated").textContent =
      `updated ${new Date().toLocaleTimeString("en-GB")}`;
    document.body.dataset.refreshed = String(Date.now());
  } catch (error) {
    if (error instanceof Unauthorised) askForToken(error.message);
    else document.getElementById("updated").textContent = `refresh failed: ${error.message}`;
  }
}

function stopRefreshing() {
  if (refreshTimer) clearInterval(refreshTimer);
  refreshTimer = null;
}

async function start() {
  try {
    await api(`${API}/status`);
  } catch (error) {
    if (error instanceof Unauthorised) {
      askForToken(sessionStorage.getItem(TOKEN_KEY) ? error.message : "");
      return;
    }
  }
  const dialog = document.getElementById("token-dialog");
  if (dialog.open) dialog.close();
  document.getElementById("console").hidden = false;
  document.getElementById("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
  const now = new Date();
  const since = document.getElementById("timeline-since");
  if (!since.value) since.value = localInput(new Date(now.getTime() - 24 * 3600 * 1000));
  await refresh();
  stopRefreshing();
  refreshTimer = setInterval(refresh, REFRESH_MS);
}

start();
