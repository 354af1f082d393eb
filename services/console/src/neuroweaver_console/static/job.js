// Job page: the loss/eval curves, the stage timeline and the events list (filterable by stage and type), fed by
// server-sent events from the trainer's WatchTrainingJob (the console forwards the gRPC stream; the browser never
// polls). One line per (stage, series) so an RLAIF job's SFT and policy losses are separate lines, never joined.
// The dataset section is fetched once (PreviewDataset reads the file: not on the page's critical path). The worker's
// log is read from the console every 2 s while the job runs (ReadTrainingJobLogs from the last offset; a log is not an
// event stream) and its lines are inserted as text: they are the worker's output, never markup.
(function () {
  "use strict";
  const script = document.currentScript;
  const canvas = document.getElementById("loss-chart");
  const list = document.getElementById("events");
  const palette = ["#0a58ca", "#c2410c", "#146c2e", "#7e22ce", "#a4161a", "#0e7490"];
  const series = new Map();
  let points = 0;
  let lastStep = 0;
  const chart = new Chart(canvas, {
    type: "line",
    data: { datasets: [] },
    options: {
      animation: false, parsing: false, normalized: true, maintainAspectRatio: false,
      scales: { x: { type: "linear", title: { display: true, text: "step" } }, y: { title: { display: true, text: "loss" } } },
      plugins: { legend: { position: "bottom" } },
    },
  });

  function line(label, dashed) {
    let ds = series.get(label);
    if (!ds) {
      const colour = palette[series.size % palette.length];
      ds = { label: label, data: [], borderColor: colour, backgroundColor: colour, pointRadius: dashed ? 3 : 0,
             borderDash: dashed ? [6, 4] : [], borderWidth: 2 };
      series.set(label, ds);
      chart.data.datasets.push(ds);
    }
    return ds;
  }

  function add(label, dashed, x, y) {
    if (y === null || y === undefined) return;
    line(label, dashed).data.push({ x: x, y: y });
    points += 1;
  }

  function text(id, value) {
    const el = document.getElementById(id);
    if (el && value !== undefined && value !== "") el.textContent = value;
  }

  // --- stage timeline: each stage from its first event to its STAGE_COMPLETED (or the job's end) ---------------------
  const stages = new Map();  // name → {start, end, state, row}
  const stageTable = document.getElementById("stages");
  const TERMINAL = { succeeded: "completed", failed: "failed", cancelled: "cancelled" };
  let ended = false;

  function clock(ts) {
    return new Date(ts * 1000).toISOString().slice(11, 19);
  }

  function span(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return h ? h + "h " + String(m).padStart(2, "0") + "m" : m + "m " + String(s).padStart(2, "0") + "s";
  }

  function stageOf(ev) {
    let st = stages.get(ev.stage);
    if (!st) {
      const row = stageTable.tBodies[0].insertRow();
      row.id = "stage-" + ev.stage;
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = ev.stage;
      row.appendChild(th);
      for (let i = 0; i < 5; i++) row.insertCell();
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      bar.appendChild(document.createElement("span"));
      row.cells[5].appendChild(bar);
      st = { start: ev.ts, end: null, state: "running", row: row };
      stages.set(ev.stage, st);
      stageTable.hidden = false;
      document.getElementById("stages-empty").hidden = true;
    }
    return st;
  }

  function onStage(ev) {
    if (ev.stage && ev.ts) {
      const st = stageOf(ev);
      if (ev.type === "stage completed") {
        st.end = ev.ts;
        st.state = "completed";
      } else if (ev.type === "stage started" || (st.state !== "completed" && (!ev.state || ev.state === "running"))) {
        st.end = null;  // a resumed attempt runs the stage again
        st.state = "running";
      }
    }
    if (ev.state === "paused" || TERMINAL[ev.state]) {
      for (const st of stages.values()) {
        if (st.state === "running") {
          st.end = ev.ts;
          st.state = TERMINAL[ev.state] || "paused";
        }
      }
    }
  }

  function drawStages() {
    const all = Array.from(stages.values());
    if (!all.length) return;
    const now = Date.now() / 1000;
    const first = Math.min.apply(null, all.map(function (st) { return st.start; }));
    const last = Math.max.apply(null, all.map(function (st) { return st.end === null ? now : st.end; }));
    const total = Math.max(last - first, 1);
    for (const st of all) {
      const end = st.end === null ? now : st.end;
      const cells = st.row.cells;
      st.row.className = "stage-" + st.state;
      cells[1].textContent = st.state;
      cells[2].textContent = clock(st.start);
      cells[3].textContent = st.end === null ? "–" : clock(st.end);
      cells[4].textContent = span(end - st.start) + (st.end === null ? " so far" : "");
      const bar = cells[5].firstChild.firstChild;
      bar.style.left = (100 * (st.start - first)) / total + "%";
      bar.style.width = (100 * (end - st.start)) / total + "%";
    }
  }
  // Running stages' durations grow between events.
  const ticker = setInterval(function () { if (ended) clearInterval(ticker); drawStages(); }, 1000);

  // --- event filters ---------------------------------------------------------------------------------------------
  const stageFilter = document.getElementById("events-stage");
  const typeFilter = document.getElementById("events-type");

  function option(select, value) {
    if (!value || Array.from(select.options).some(function (o) { return o.value === value; })) return;
    select.add(new Option(value, value));
  }

  function shown(li) {
    return (!stageFilter.value || li.dataset.stage === stageFilter.value) && (!typeFilter.value || li.dataset.type === typeFilter.value);
  }

  function filter() {
    for (const li of list.children) li.hidden = !shown(li);
  }
  stageFilter.addEventListener("change", filter);
  typeFilter.addEventListener("change", filter);

  function onEvent(ev) {
    onStage(ev);
    const stage = ev.stage || "train";
    if (ev.step) {
      lastStep = ev.step.step;
      add(stage + " loss", false, ev.step.step, ev.step.loss);
      if (ev.step.total) {
        document.getElementById("job-progress").value = Math.round((100 * ev.step.step) / ev.step.total);
        text("job-steps", ev.step.step + "/" + ev.step.total);
      }
      text("job-eta", ev.step.eta);
    }
    if (ev.type === "eval" && ev.metrics) {
      const x = ev.metrics.step !== undefined ? ev.metrics.step : lastStep;
      for (const [name, value] of Object.entries(ev.metrics)) {
        if (name !== "step" && name.indexOf("loss") !== -1) add(stage + " " + name, true, x, value);
      }
    }
    if (ev.state) text("job-state", ev.state);
    if (ev.stage) text("job-stage", ev.stage);
    if (ev.type !== "step") {
      const li = document.createElement("li");
      const metrics = ev.metrics ? " " + Object.entries(ev.metrics).map(([k, v]) => k + "=" + (v === null ? "nan" : +v.toPrecision(4))).join(" ") : "";
      li.textContent = ev.time + " [" + (ev.stage || "-") + "] " + ev.type + (ev.state ? " → " + ev.state : "") + metrics + (ev.message ? " — " + ev.message : "");
      li.dataset.stage = ev.stage || "";
      li.dataset.type = ev.type;
      li.hidden = !shown(li);
      option(stageFilter, ev.stage);
      option(typeFilter, ev.type);
      list.insertBefore(li, list.firstChild);
    }
  }

  // Draw at most once a frame however fast events arrive (a replay sends hundreds at once).
  let pending = false;
  function redraw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(function () {
      pending = false;
      chart.update("none");
      canvas.dataset.points = String(points);
      drawStages();
    });
  }

  const source = new EventSource(script.dataset.events);
  source.addEventListener("job", function (msg) { onEvent(JSON.parse(msg.data)); redraw(); });
  source.addEventListener("end", function () {
    source.close();
    ended = true;
    drawStages();  // the job is over; without close() the browser would reconnect and replay again
    for (const form of document.querySelectorAll(".actions form")) form.remove();
    text("live-status", "The job has ended; reload for its final state.");
    document.body.dataset.streamEnded = "1";
  });
  source.addEventListener("failure", function (msg) {
    source.close();
    const detail = JSON.parse(msg.data);
    text("live-status", "Live updates stopped: " + detail.code + " " + detail.message);
  });

  // --- worker log -------------------------------------------------------------------------------------------------
  const logBox = document.getElementById("logs-text");
  const logStatus = document.getElementById("logs-status");
  const attemptField = document.getElementById("logs-attempt-field");
  const attemptSelect = document.getElementById("logs-attempt");
  const MAX_LOG_LINES = 5000;  // the oldest go first
  let logChoice = 0;  // the attempt asked for; 0 follows the latest
  let logAttempt = 0;  // the attempt whose lines are in the box
  let offset = null;  // where the next read starts (a string: pod-log offsets are nanoseconds)
  let logEnded = false;  // the attempt is over and read to its end, read once more after that
  let logTimer = null;
  let generation = 0;  // a newer choice of attempt discards the answers to older reads

  function logLine(text, className) {
    const div = document.createElement("div");
    div.textContent = text;
    if (className) div.className = className;
    logBox.appendChild(div);
  }

  function addLogLines(lines) {
    const atEnd = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 8;
    for (const line of lines) logLine(line);
    while (logBox.childElementCount > MAX_LOG_LINES) logBox.firstElementChild.remove();
    if (atEnd) logBox.scrollTop = logBox.scrollHeight;
  }

  function attemptOptions(count) {
    if (attemptSelect.options.length === count + 1) return;
    attemptSelect.textContent = "";
    attemptSelect.add(new Option("latest", "0"));
    for (let i = count; i >= 1; i--) attemptSelect.add(new Option(String(i), String(i)));
    attemptSelect.value = String(logChoice);
    attemptField.hidden = count < 2;
  }

  function nextRead(ms) {
    clearTimeout(logTimer);
    logTimer = setTimeout(readLog, ms);
  }

  function onLog(data, wasTail) {
    if (!logAttempt) logAttempt = data.attempt;
    addLogLines(data.lines);
    offset = data.next_offset;
    attemptOptions(data.attempts);
    const over = data.terminal || data.attempt < data.attempts;
    logStatus.textContent = "Attempt " + data.attempt + " of " + data.attempts + " (" + data.executor + "), job " + data.state +
      (wasTail && data.truncated ? "; earlier lines not shown" : "") + (over ? "" : "; following");
    if (data.truncated && !wasTail) return nextRead(0);  // more is there already
    if (!logChoice && data.attempts > logAttempt) {  // the job started another attempt: its log from the start
      logAttempt += 1;
      offset = "0";
      logLine("— attempt " + logAttempt + " —", "log-attempt");
      return nextRead(0);
    }
    if (over) {
      if (logEnded) return;
      logEnded = true;  // the worker may print its last lines as it exits
    }
    nextRead(2000);
  }

  function readLog() {
    const mine = generation;
    const query = new URLSearchParams({ attempt: String(logChoice || logAttempt) });
    if (offset !== null) query.set("offset", offset);
    const wasTail = offset === null;
    fetch(logBox.dataset.src + "?" + query, { credentials: "same-origin" })
      .then(function (resp) {
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        return resp.json();
      })
      .then(function (data) {
        if (mine !== generation) return;
        if (!data.error) return onLog(data, wasTail);
        const e = data.error;
        if (e.code === "PERMISSION_DENIED") {
          logStatus.textContent = "Your role cannot read this job's logs (it takes an operator): " + e.message;
          return;
        }
        logStatus.textContent = (e.reason === "LOGS_NOT_FOUND" ? "No log yet: " : e.code + ": ") + e.message;
        if (!ended) nextRead(2000);  // the worker may start, another replica may answer
      })
      .catch(function (err) {
        if (mine !== generation) return;
        logStatus.textContent = "The log could not be read: " + err.message;
        if (!ended) nextRead(2000);
      });
  }

  attemptSelect.addEventListener("change", function () {
    generation += 1;
    logChoice = Number(attemptSelect.value);
    logAttempt = logChoice;
    offset = null;
    logEnded = false;
    logBox.textContent = "";
    nextRead(0);
  });
  readLog();

  const dataset = document.getElementById("dataset-preview");
  if (dataset) {
    fetch(dataset.dataset.src, { credentials: "same-origin" })
      .then(function (resp) {
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        return resp.text();
      })
      .then(function (html) { dataset.innerHTML = html; })  // rendered and escaped by the console's templates
      .catch(function (err) { dataset.textContent = "The dataset preview could not be loaded: " + err.message; });
  }

  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", function (e) { if (!window.confirm(form.dataset.confirm)) e.preventDefault(); });
  }
})();
