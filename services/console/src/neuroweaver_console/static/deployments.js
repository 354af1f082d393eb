// Deployment page: the state, replicas, versions and conditions follow WatchDeployment live (server-sent events
// forwarded by the console, no polling); the performance table and chart refresh from GetDeploymentMetrics every
// few seconds (the deployer samples the replicas as often).
(function () {
  "use strict";
  const script = document.currentScript;
  const pageRevision = Number(script.dataset.revision);
  const REFRESH_MS = 5000;
  const MAX_POINTS = 120;
  let updates = 0;

  function text(id, value) {
    const el = document.getElementById(id);
    if (el) el.textContent = value;
  }

  function cell(tag, value) {
    const el = document.createElement(tag);
    el.textContent = value;
    return el;
  }

  function onDeployment(d) {
    const state = document.getElementById("dep-state");
    state.textContent = d.state;
    state.className = "state state-" + d.state.replace(/ /g, "-");
    text("dep-replicas", d.ready + "/" + d.replicas);
    text("dep-revision", String(d.revision));
    text("dep-updated", d.updated || "–");
    const endpoint = document.getElementById("dep-endpoint");
    endpoint.replaceChildren();
    if (d.endpoint) {
      endpoint.append(cell("code", d.endpoint), " (gRPC)");
    } else {
      endpoint.textContent = "–";
    }
    const versions = document.getElementById("dep-versions");
    versions.replaceChildren();
    for (const v of d.versions) {
      const a = cell("a", v.label);
      a.className = "tag";
      a.href = "/models/" + encodeURIComponent(v.model);
      versions.append(a, " ");
    }
    if (!d.versions.length) versions.textContent = "–";
    const rows = document.getElementById("conditions-rows");
    rows.replaceChildren();
    for (const c of d.conditions) {
      const tr = document.createElement("tr");
      for (const value of [c.type, c.status, c.reason, c.message, c.since]) tr.append(cell("td", value));
      rows.append(tr);
    }
    if (d.revision !== pageRevision) {
      const notice = document.getElementById("revision-notice");
      notice.textContent = "Revision " + d.revision + " is live now; reload the page for the revision history.";
      notice.hidden = false;
    }
    updates += 1;
    document.body.dataset.liveUpdates = String(updates);
  }

  const source = new EventSource(script.dataset.events);
  source.addEventListener("deployment", function (msg) { onDeployment(JSON.parse(msg.data)); });
  source.addEventListener("end", function () {
    source.close();  // deleted: without close() the browser would reconnect
    text("live-status", "The deployment was deleted.");
  });
  source.addEventListener("failure", function (msg) {
    source.close();
    const detail = JSON.parse(msg.data);
    text("live-status", "Live updates stopped: " + detail.code + " " + detail.message);
  });

  // Performance: a table of the last window and a chart of the totals since the page opened.
  const canvas = document.getElementById("metrics-chart");
  const chart = new Chart(canvas, {
    type: "line",
    data: {
      labels: [],
      datasets: [
        { label: "requests/s", data: [], borderColor: "#0a58ca", backgroundColor: "#0a58ca", yAxisID: "y", pointRadius: 0 },
        { label: "tokens/s", data: [], borderColor: "#146c2e", backgroundColor: "#146c2e", yAxisID: "y", pointRadius: 0 },
        { label: "latency p95 (ms)", data: [], borderColor: "#c2410c", backgroundColor: "#c2410c", yAxisID: "y1",
          pointRadius: 0, borderDash: [6, 4] },
      ],
    },
    options: {
      animation: false, maintainAspectRatio: false,
      scales: {
        y: { beginAtZero: true, title: { display: true, text: "per second" } },
        y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "ms" } },
      },
      plugins: { legend: { position: "bottom" } },
    },
  });

  function showMetrics(m) {
    const unavailable = document.getElementById("metrics-unavailable");
    const live = document.getElementById("metrics-live");
    if (!m.available) {
      unavailable.textContent = "Live performance is not available: " + m.code + (m.reason ? " " + m.reason : "") +
        (m.message ? " — " + m.message : "");
      unavailable.hidden = false;
      live.hidden = true;
      return;
    }
    unavailable.hidden = true;
    live.hidden = false;
    text("metrics-caption", "Last " + m.window + " s, sampled " + m.sample_time + " from " + m.source + ".");
    const body = document.getElementById("metrics-rows");
    body.replaceChildren();
    for (const row of m.rows) {
      const tr = document.createElement("tr");
      const th = cell("th", row[0]);
      th.scope = "row";
      tr.append(th);
      for (const value of row.slice(1)) tr.append(cell("td", value));
      body.append(tr);
    }
    chart.data.labels.push(new Date().toLocaleTimeString());
    chart.data.datasets[0].data.push(m.chart.rps);
    chart.data.datasets[1].data.push(m.chart.tokens);
    chart.data.datasets[2].data.push(m.chart.p95_ms);
    if (chart.data.labels.length > MAX_POINTS) {
      chart.data.labels.shift();
      for (const ds of chart.data.datasets) ds.data.shift();
    }
    chart.update("none");
  }

  async function refresh() {
    if (document.hidden) return;
    try {
      const response = await fetch(script.dataset.metrics, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!response.ok || !(response.headers.get("Content-Type") || "").startsWith("application/json")) {
        throw new Error("HTTP " + response.status);
      }
      showMetrics(await response.json());
    } catch (err) {
      text("metrics-caption", "Refreshing the performance failed (" + err.message + "); retrying.");
    }
  }
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
