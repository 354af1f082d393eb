// Experiment page: one small plot per metric of each treatment's relative lift (a point) inside its interval (a
// floating bar), in percent, with zero marked. The numbers come from the table's data (data-chart on the canvas);
// the table stays the accessible, exact view.
(function () {
  "use strict";
  const good = "#146c2e", line = "#1b1f24", zero = "#a4161a";
  for (const canvas of document.querySelectorAll("canvas[data-chart]")) {
    const d = JSON.parse(canvas.dataset.chart);
    canvas.parentElement.style.height = 50 + 34 * d.labels.length + "px";
    new Chart(canvas, {
      type: "bar",
      data: {
        labels: d.labels,
        datasets: [
          { type: "bar", label: "interval", data: d.labels.map((_, i) => [d.lower[i], d.upper[i]]),
            backgroundColor: "rgba(10, 88, 202, 0.25)", borderColor: "#0a58ca", borderWidth: 1, barPercentage: 0.5 },
          { type: "line", label: "lift", data: d.lift, showLine: false, pointRadius: 5, pointStyle: "rectRot",
            backgroundColor: good, borderColor: line, indexAxis: "y" },
        ],
      },
      options: {
        indexAxis: "y", animation: false, maintainAspectRatio: false,
        scales: {
          x: { title: { display: true, text: "lift vs control (%)" },
               suggestedMin: Math.min(0, ...d.lower), suggestedMax: Math.max(0, ...d.upper),  // zero always in view
               grid: { color: (ctx) => (ctx.tick && ctx.tick.value === 0 ? zero : "#e5e7eb"),
                       lineWidth: (ctx) => (ctx.tick && ctx.tick.value === 0 ? 2 : 1) } },
        },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { label: (ctx) => (ctx.dataset.label === "lift"
            ? "lift " + d.lift[ctx.dataIndex].toFixed(2) + "%"
            : "interval [" + d.lower[ctx.dataIndex].toFixed(2) + "%, " + d.upper[ctx.dataIndex].toFixed(2) + "%]") } },
        },
      },
    });
    canvas.dataset.drawn = "1";
  }
})();
