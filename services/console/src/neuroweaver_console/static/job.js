// Job page: the loss/eval curves and the events list, fed by server-sent events from the trainer's
// WatchTrainingJob (the console forwards the gRPC stream; the browser never polls). One line per (stage, series)
// so an RLAIF job's SFT and policy losses are separate lines, never joined.
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

  function onEvent(ev) {
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
    });
  }

  const source = new EventSource(script.dataset.events);
  source.addEventListener("job", function (msg) { onEvent(JSON.parse(msg.data)); redraw(); });
  source.addEventListener("end", function () {
    source.close();  // the job is over; without close() the browser would reconnect and replay again
    for (const form of document.querySelectorAll(".actions form")) form.remove();
    text("live-status", "The job has ended; reload for its final state.");
    document.body.dataset.streamEnded = "1";
  });
  source.addEventListener("failure", function (msg) {
    source.close();
    const detail = JSON.parse(msg.data);
    text("live-status", "Live updates stopped: " + detail.code + " " + detail.message);
  });

  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", function (e) { if (!window.confirm(form.dataset.confirm)) e.preventDefault(); });
  }
})();
