// Lineage graph (model and version pages): Cytoscape.js draws the nodes and edges the page carries as JSON
// (lineage.py), laid out in ranks left to right by its dagre extension: what went in, the training jobs, the versions.
// Version and job nodes open their page; the mouse over a node picks out its arrows. The table under the graph says
// the same for keyboards and screen readers.
// Once drawn, the container tells what it shows in data-nodes / data-edges (counts) and data-drawn (JSON: each node's
// id, kind, caption, whether it is the focus, its position in the container; each edge's ends and kind).
(function () {
  "use strict";
  const container = document.getElementById("lineage-graph");
  const source = document.getElementById("lineage-data");
  if (!container || !source) return;
  const graph = JSON.parse(source.textContent);

  const NODE_W = 212, NODE_H = 38, PAD = 12, MIN_ZOOM = 0.6;
  // Fill and border per kind: the console's palette.
  const KINDS = {
    version: ["#e7eefc", "#0a58ca"],
    job: ["#fff4e5", "#b45309"],
    dataset: ["#e9f6ec", "#146c2e"],
    judge: ["#f3e8fd", "#7e22ce"],
    base: ["#eef1f4", "#4a5360"],
  };
  const style = [
    {
      selector: "node",
      style: {
        shape: "round-rectangle", width: NODE_W, height: NODE_H,
        // Slightly see-through: an arrow that passes behind a box still shows as one line.
        "background-color": "#fff", "background-opacity": 0.88, "border-color": "#8c959f", "border-width": 1.2,
        label: "data(text)", "text-wrap": "wrap", "text-max-width": NODE_W - 8,
        "text-valign": "center", "text-halign": "center",
        "font-family": "ui-monospace, SFMono-Regular, Menlo, monospace", "font-size": 11, "line-height": 1.3,
        color: "#1b1f24",
      },
    },
    ...Object.entries(KINDS).map(([kind, [fill, stroke]]) => ({
      selector: `node[kind = "${kind}"]`,
      style: { "background-color": fill, "border-color": stroke },
    })),
    { selector: "node[?focus]", style: { "border-width": 3, "border-color": "#0d1b2a" } },
    {
      selector: "edge",
      style: {
        // From the source's right side to the target's left side: an arrow between neighbouring ranks stays in the
        // gap between them, clear of every box.
        width: 1.4, "line-color": "#6b7685", "curve-style": "straight",
        "source-endpoint": "50% 0%", "target-endpoint": "-50% 0%",
        "target-arrow-shape": "triangle", "target-arrow-color": "#4a5360", "arrow-scale": 0.9,
      },
    },
    { selector: 'edge[kind = "parent"]', style: { width: 2.2, "line-color": "#0a58ca", "target-arrow-color": "#0a58ca" } },
    { selector: "edge.near", style: { width: 2.6, "line-color": "#0d1b2a", "target-arrow-color": "#0d1b2a" } },
  ];

  // Cytoscape puts a <style> in the head (its container's `position: relative`) unless an element with this id is
  // there; the CSP refuses inline styles, so registry.css has the rule and a marker stands in for the <style>.
  const CY_STYLESHEET = "__________cytoscape_stylesheet";
  if (!document.getElementById(CY_STYLESHEET)) {
    const marker = document.createElement("meta");
    marker.id = CY_STYLESHEET;
    document.head.append(marker);
  }

  const cy = cytoscape({
    container,
    elements: {
      nodes: graph.nodes.map((n) => ({ data: { ...n, text: n.caption + "\n" + n.label } })),
      edges: graph.edges.map((e) => ({ data: e })),
    },
    style,
    layout: { name: "preset" },
    maxZoom: 1,
    userZoomingEnabled: false, // the wheel scrolls the page
    boxSelectionEnabled: false,
    autoungrabify: true,
    autounselectify: true,
  });

  // Dagre (cytoscape-dagre) ranks the nodes left to right so that every arrow points right, and orders each rank to
  // cross few arrows.
  cy.layout({ name: "dagre", rankDir: "LR", nodeSep: 30, rankSep: 64, fit: false }).run();

  // As wide as the container allows, down to a zoom where labels stay legible (beyond it, drag to pan), never
  // enlarged; as tall as the graph at that zoom; centred when narrower than the container.
  const box = cy.elements().boundingBox();
  const zoom = Math.max(MIN_ZOOM, Math.min(1, (container.clientWidth - 2 * PAD) / box.w));
  container.style.height = Math.ceil(box.h * zoom + 2 * PAD) + "px";
  cy.resize();
  cy.zoom(zoom);
  cy.pan({ x: Math.max(PAD, (container.clientWidth - box.w * zoom) / 2) - box.x1 * zoom, y: PAD - box.y1 * zoom });

  cy.on("tap", "node", (event) => {
    const href = event.target.data("href");
    if (href) window.location.assign(href);
  });
  // Under the mouse, a node's arrows stand out (and the pointer says whether it opens a page).
  cy.on("mouseover", "node", (event) => {
    event.target.connectedEdges().addClass("near");
    container.classList.toggle("pointing", !!event.target.data("href"));
  });
  cy.on("mouseout", "node", () => {
    cy.edges().removeClass("near");
    container.classList.remove("pointing");
  });

  container.dataset.nodes = String(cy.nodes().length);
  container.dataset.edges = String(cy.edges().length);
  container.dataset.drawn = JSON.stringify({
    nodes: cy.nodes().map((n) => {
      const at = n.renderedPosition();
      return { id: n.id(), kind: n.data("kind"), caption: n.data("caption"), focus: n.data("focus"),
               x: Math.round(at.x), y: Math.round(at.y) };
    }),
    edges: cy.edges().map((e) => ({ source: e.source().id(), target: e.target().id(), kind: e.data("kind") })),
  });
})();
