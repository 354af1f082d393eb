// Audit page: new registry events arrive as server-sent events (the console forwards WatchModelEvents, filtered
// like the page) and go on top of the table. Rows are built with textContent: event details are data, never HTML.
(function () {
  "use strict";
  const table = document.getElementById("audit-events");
  const body = table.tBodies[0];
  const empty = document.getElementById("audit-empty");
  const live = document.getElementById("audit-live");
  let arrived = 0;

  function cell(row, className) {
    const td = row.insertCell();
    if (className) td.className = className;
    return td;
  }

  function link(parent, text, href) {
    if (!href) { parent.append(text); return; }
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    parent.append(a);
  }

  function add(ev) {
    const row = document.createElement("tr");
    row.dataset.seq = String(ev.seq);
    row.className = "new";
    cell(row, "time").textContent = ev.time;
    cell(row).textContent = ev.actor || "–";
    const what = cell(row);
    link(what, ev.model, ev.model_href);
    if (ev.resource) {
      if (ev.model) what.append(" / ");
      link(what, ev.resource, ev.resource_href);
    }
    const action = document.createElement("span");
    action.className = "action";
    action.textContent = ev.type;
    cell(row).append(action);
    const details = cell(row, "details");
    for (const [key, value] of ev.details) {
      const item = document.createElement("span");
      item.className = "detail";
      const k = document.createElement("span");
      k.className = "key";
      k.textContent = key;
      item.append(k, " " + value);
      details.append(item);
    }
    body.insertBefore(row, body.firstChild);
    empty.hidden = true;
    arrived += 1;
    live.textContent = arrived + (arrived === 1 ? " new event" : " new events") + ", the newest: " + ev.type + " by " + (ev.actor || "unknown") + ".";
  }

  const source = new EventSource(table.dataset.live);
  source.addEventListener("audit", function (msg) { add(JSON.parse(msg.data)); });
  source.addEventListener("failure", function (msg) {
    source.close();
    const detail = JSON.parse(msg.data);
    live.textContent = "Live updates stopped: " + detail.code + " " + detail.message + ". Reload to resume.";
  });
  source.addEventListener("open", function () { document.body.dataset.live = "1"; });
})();
