"""The pack's front-end extension (web/js) in headless Chromium on a real ComfyUI server, for each front end at hand
and each node renderer: the classic LiteGraph canvas and the new Vue node renderer ("Nodes 2.0",
Comfy.VueNodes.Enabled). The pack's nodes are in the node library, a template loads with no missing or marked nodes
and converts to the same API prompt as tools/workflows/workflow_api.py, and after a run the cluster gallery, the score
table and the report link appear on their nodes, with no console error from the pack.

Front ends: the one the host's own comfyui-frontend-package serves, then each folder in FINEXTRACT_FRONTEND_ROOTS
(separated by os.pathsep), served with ComfyUI's --front-end-root: the static/ folder of another
comfyui-frontend-package, for example. Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from PIL import Image
from test_workflows import load_workflow, small_prompt, write_reference_images

from fixtures.chromium_cdp import Chromium, find_chromium
from fixtures.stand_in_models import stand_in_files, write_workflow_stand_ins
from tools.host.comfy_server import REPO_ROOT, ComfyServer
from tools.workflows.workflow_api import ui_to_api

TEMPLATE = "finextract_audit_my_images"
RENDERERS = {"classic": False, "nodes-2.0": True}  # the value of the front end's Comfy.VueNodes.Enabled setting
ARTIFACTS = os.path.join(REPO_ROOT, "test-artifacts")


def front_ends() -> list[str | None]:
    """None for the host's own front end, then the --front-end-root folders named in FINEXTRACT_FRONTEND_ROOTS."""
    return [None, *(root for root in os.environ.get("FINEXTRACT_FRONTEND_ROOTS", "").split(os.pathsep) if root)]


def hold_the_templates_files(models: str) -> None:
    """Each model file the templates name, beside the stand-in it stands for (a link to it): a current front end
    marks a loader whose file the server does not list, as it would for a user who lacks the file."""
    for template_file, stand_in in stand_in_files().items():
        for folder in os.listdir(models):
            source = os.path.join(models, folder, stand_in)
            target = os.path.join(models, folder, template_file)
            if os.path.isfile(source) and not os.path.lexists(target):
                os.symlink(source, target)


@pytest.fixture(scope="module")
def base(host, tmp_path_factory) -> str:  # host: the stand-in models take their shapes from ComfyUI's own modules
    base = str(tmp_path_factory.mktemp("frontend-base"))
    write_workflow_stand_ins(f"{base}/models")
    hold_the_templates_files(f"{base}/models")
    write_reference_images(f"{base}/input/references")
    os.makedirs(f"{base}/user/default", exist_ok=True)
    with open(f"{base}/user/default/comfy.settings.json", "w") as f:
        json.dump({"Comfy.TutorialCompleted": True}, f)  # no first-run template browser over the graph
    return base


@pytest.fixture(scope="module", params=front_ends(), ids=lambda root: "own-front-end" if root is None else root)
def server(base, request):
    if find_chromium() is None:
        pytest.skip("no Chromium: tools/host/bootstrap_host.sh installs Debian's chromium package where it can")
    options = () if request.param is None else ("--front-end-root", request.param)
    log = os.path.join(base, f"comfyui-front-end-{len(os.listdir(base))}.log")
    with ComfyServer(base, log_path=log, lab=False, options=options) as running:  # the pack alone, as users have it
        yield running


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


PANELS_READY = """(() => {
  const images = [...document.querySelectorAll('.finextract-gallery img')];
  return images.length > 0 && images.every((i) => i.complete && i.naturalWidth > 0)
    && !!document.querySelector('.finextract-scores table')
    && !!document.querySelector('.finextract-report-link button');
})()"""
# Each panel's visible height and its content's: a panel the node is too small for scrolls (or is cut off).
PANEL_HEIGHTS = """['finextract-gallery', 'finextract-scores', 'finextract-report-link'].map((name) => {
  const panel = document.querySelector('.' + name);
  return [name, panel.clientHeight, panel.scrollHeight];
})"""
GRAPH_NODES = "(app.graph.nodes ?? app.graph._nodes)"


async def browse_and_run(server, page, workflow: dict, prompt: dict, pack_nodes: list[str], screenshot: str) -> dict:
    """Opens ComfyUI, loads the template, runs ``prompt`` as this page's client and waits for the pack's panels."""
    await page.navigate(server.url)
    await page.wait_for("!!(window.app && app.graph && window.LiteGraph && app.api)", timeout=120)
    await page.wait_for("app.extensions.some((e) => e.name === 'FineXtract.AuditReport')")
    found = {"front_end": await page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? null"),
             "vue_nodes": await page.evaluate("app.extensionManager.setting.get('Comfy.VueNodes.Enabled')")}
    found["library"] = await page.evaluate(
        f"{json.dumps(pack_nodes)}.map((t) => [t, LiteGraph.registered_node_types[t]?.category ?? null])")
    await page.evaluate(f"app.loadGraphData({json.dumps(workflow)})")
    await asyncio.sleep(1.0)  # let the front end check the loaded graph (missing nodes and models)
    found["loaded"] = await page.evaluate(
        f"{GRAPH_NODES}.map((n) => [n.id, n.type, n.type in LiteGraph.registered_node_types || "
        "['Note', 'MarkdownNote'].includes(n.type), !!n.has_errors])")
    found["node_elements"] = await page.evaluate("document.querySelectorAll('[data-node-id]').length")
    found["frontend_prompt"] = await page.evaluate("app.graphToPrompt().then((p) => p.output)")
    queued = await page.evaluate(
        f"app.api.fetchApi('/prompt', {{method: 'POST', headers: {{'Content-Type': 'application/json'}}, "
        f"body: JSON.stringify({{prompt: {json.dumps(prompt)}, client_id: app.api.clientId}})}}).then((r) => r.status)")
    assert queued == 200
    await page.wait_for(PANELS_READY, timeout=240)
    found["report_html"] = await page.evaluate(
        f"(() => {{ const n = {GRAPH_NODES}.find((n) => n.type === 'FineXtractAuditReportV2'); "
        "return app.api.fetchApi('/view?' + new URLSearchParams({filename: 'report.html', "
        "subfolder: n.widgets.find((w) => w.name === 'folder_prefix').value, type: 'output'}))"
        ".then((r) => r.text()); })()")
    # Frame the nodes that carry the panels, then keep the picture as a test artifact.
    await page.evaluate(
        f"(() => {{ const wanted = {GRAPH_NODES}.filter((n) => ['FineXtractCliqueClusterV2', "
        "'FineXtractExtractionMetrics', 'FineXtractAuditReportV2'].includes(n.type)); "
        "const xs = wanted.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]); "
        "const ys = wanted.flatMap((n) => [n.pos[1] - 30, n.pos[1] + n.size[1]]); "
        "app.canvas.ds.fitToBounds([Math.min(...xs), Math.min(...ys), Math.max(...xs) - Math.min(...xs), "
        "Math.max(...ys) - Math.min(...ys)]); app.graph.setDirtyCanvas(true, true); })()")
    await asyncio.sleep(1.0)  # panels are drawn on the page (and laid out) only for nodes in view
    found["panel_heights"] = await page.evaluate(PANEL_HEIGHTS)
    await page.screenshot(screenshot)
    return found


@pytest.mark.parametrize("renderer", RENDERERS)
def test_front_end_shows_the_results_in_headless_chromium(server, object_info, renderer):
    server.post("/settings/Comfy.VueNodes.Enabled", RENDERERS[renderer])
    workflow = load_workflow(TEMPLATE)
    prompt = small_prompt(server, object_info, TEMPLATE)
    pack_nodes = sorted(t for t, info in object_info.items() if info["category"].startswith("FineXtract"))
    os.makedirs(ARTIFACTS, exist_ok=True)
    screenshot = os.path.join(ARTIFACTS, f"front_end_{server.launcher.port}_{renderer}.png")

    async def scenario():
        async with Chromium(find_chromium()) as page:
            return await browse_and_run(server, page, workflow, prompt, pack_nodes, screenshot), page.errors

    found, errors = asyncio.run(scenario())
    named = os.path.join(ARTIFACTS, f"front_end_{found['front_end']}_{renderer}.png")
    os.replace(screenshot, named)
    assert found["vue_nodes"] is RENDERERS[renderer], f"the front end did not take the {renderer} renderer"
    if RENDERERS[renderer]:  # Nodes 2.0 draws every node as an element of its own
        assert found["node_elements"] >= len(workflow["nodes"]), found["node_elements"]
    assert [node for node, category in found["library"] if not (category or "").startswith("FineXtract")] == []
    assert len(found["loaded"]) == len(workflow["nodes"])
    assert [node for node in found["loaded"] if not node[2] or node[3]] == [], "missing or marked nodes after loading"
    # The editor's own conversion of the loaded template agrees with tools/workflows/workflow_api.py.
    ours = {node_id: (node["class_type"], node["inputs"]) for node_id, node in ui_to_api(workflow, object_info).items()}
    assert {k: (v["class_type"], v["inputs"]) for k, v in found["frontend_prompt"].items()} == ours
    assert "FineXtract audit report" in found["report_html"]
    cut = [(name, shown, whole) for name, shown, whole in found["panel_heights"] if not 0 < whole <= shown + 1]
    assert cut == [], f"panels shown in part (name, visible px, content px): {cut}"
    # The editor also asks api.comfy.org about every node type it shows; unreachable here, and not this pack's doing.
    pack_errors = [e for e in errors if "/extensions/finextract" in e or ("finextract" in e.lower()
                                                                          and "api.comfy.org" not in e)]
    assert pack_errors == [], errors
    with Image.open(named) as picture:
        assert picture.size[0] > 0
