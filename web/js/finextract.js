// FineXtract's results inside the graph. After an Audit Report node runs, its UI output ("finextract_report") is
// shown where it belongs: the cluster gallery on the Clique Cluster node that fed it, the score table on the
// Extraction Metrics node, and the links to the HTML report on the report node itself.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

// Each report node type, and its inputs that the Clique Cluster and the Extraction Metrics nodes feed.
const REPORT_NODES = {
  FineXtractAuditReportV2: { clusters: "clusters", scores: "scores" },
  FineXtractAuditReport: { clusters: "clusters_json", scores: "metrics_json" }, // deprecated: JSON inputs
};

function viewUrl(subfolder, filename) {
  const query = new URLSearchParams({ filename, subfolder, type: "output" });
  return api.apiURL(`/view?${query}`);
}

function element(tag, attributes = {}, children = []) {
  const made = document.createElement(tag);
  Object.assign(made, attributes);
  made.append(...children);
  return made;
}

// Just tall enough for every widget at its minimum height.
function fitNode(node) {
  node.setSize([Math.max(node.size[0], 340), node.computeSize()[1]]);
  app.graph.setDirtyCanvas(true, true);
}

// One DOM widget per node and name, replaced in place on every run (never serialised into the workflow).
function showPanel(node, name, content) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    const panel = element("div");
    const container = element("div", { className: name }, [panel]);
    container.style.cssText = "font: 12px sans-serif; color: var(--input-text, #ddd); overflow: auto;";
    // The canvas gives a DOM widget 50 px unless it asks for more, less its margin above and below: the panel asks
    // for its content's height. The node grows again whenever the panel would be cut: once the panel is laid out,
    // once its images have loaded, and once the node's own image preview (a widget too) has taken its share.
    widget = node.addDOMWidget(name, "finextract_panel", container, { serialize: false, hideOnZoom: false,
      getMinHeight: () => panel.offsetHeight + 2 * (widget.margin ?? 10) });
    const refitIfCut = () => container.clientHeight < panel.offsetHeight && fitNode(node);
    const observer = new ResizeObserver(refitIfCut);
    observer.observe(panel);
    observer.observe(container);
  }
  widget.element.firstElementChild.replaceChildren(content);
  fitNode(node);
}

function upstreamNode(node, inputName) {
  const slot = node.findInputSlot(inputName);
  return slot >= 0 ? node.getInputNode(slot) : null;
}

function gallery(panel) {
  const cells = panel.clusters.map(({ filename, size, score }, index) => {
    const image = element("img", { src: viewUrl(panel.subfolder, filename), title: filename });
    image.style.cssText = "width: 96px; height: 96px; object-fit: cover; display: block;";
    return element("figure", {}, [image, element("figcaption", { textContent: `#${index}: ${size} candidates, score ${score.toFixed(3)}` })]);
  });
  const grid = element("div", {}, cells);
  grid.style.cssText = "display: flex; flex-wrap: wrap; gap: 6px;";
  grid.querySelectorAll("figure").forEach((f) => (f.style.margin = "0"));
  return grid;
}

function scoreTable(panel) {
  const header = element("tr", {}, ["reference", "best match", "SSCD similarity"].map((t) =>
    element("th", { textContent: t })));
  // Each score comes with its band's colour (finextract_core/report.py), the colour the report and the grid use;
  // white on it reads on a light or a dark theme.
  const rows = panel.scores.map((row) => {
    const score = element("td", { textContent: row.score.toFixed(3), title: `band: ${row.band}` });
    score.style.cssText = `background: ${row.colour}; color: #fff; text-align: right;`;
    return element("tr", {}, [element("td", { textContent: row.name }),
      element("td", { textContent: `#${row.best_match}` }), score]);
  });
  const note = element("div", { textContent: `${panel.headline}. Thresholds ${panel.thresholds.join(" / ")}: ` +
    "a similarity, not a proof." });
  return element("div", {}, [note, element("table", {}, [header, ...rows])]);
}

async function openReport(panel) {
  // ComfyUI's /view serves HTML as a download; the report has no scripts (and says so in its CSP), so it is
  // shown from a blob instead.
  const response = await api.fetchApi(`/view?${new URLSearchParams({ filename: panel.html, subfolder: panel.subfolder,
    type: "output" })}`);
  const blob = new Blob([await response.text()], { type: "text/html" });
  window.open(URL.createObjectURL(blob), "_blank");
}

function reportLinks(panel) {
  const open = element("button", { textContent: "Open report", onclick: () => openReport(panel) });
  const html = element("a", { href: viewUrl(panel.subfolder, panel.html), download: "report.html",
    textContent: "download report.html" });
  const json = element("a", { href: viewUrl(panel.subfolder, panel.json), download: "report.json",
    textContent: "report.json" });
  for (const link of [html, json]) link.style.cssText = "color: #8af; margin-left: 8px;";
  return element("div", {}, [element("div", { textContent: panel.headline }), open, html, json]);
}

app.registerExtension({
  name: "FineXtract.AuditReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const inputs = REPORT_NODES[nodeData.name];
    if (!inputs) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const panel = output?.finextract_report?.[0];
      if (!panel) return;
      showPanel(this, "finextract-report-link", reportLinks(panel));
      const clusters = upstreamNode(this, inputs.clusters);
      if (clusters) showPanel(clusters, "finextract-gallery", gallery(panel));
      const metrics = upstreamNode(this, inputs.scores);
      if (metrics && panel.scores.length) showPanel(metrics, "finextract-scores", scoreTable(panel));
    };
  },
});
