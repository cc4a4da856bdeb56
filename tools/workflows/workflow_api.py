"""ComfyUI workflows in the graph editor's format (what "Save" writes and the pack's workflows/ hold) converted to the
API format that POST /prompt takes, using a server's /object_info for the order of each node's widgets.

The editor stores a node's widget values as one list, in the order of the node's inputs that are widgets (required
inputs first, then optional ones); an INT input with control_after_generate is followed by one extra value
("fixed", "randomize", ...) that only the editor uses. Links are [id, from node, from slot, to node, to slot, type].

Standard library only.
"""

from __future__ import annotations

import copy

# Editor-only nodes: they have no server class and never run.
EDITOR_ONLY_TYPES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
ACTIVE_MODE = 0


def ordered_inputs(node_info: dict) -> list[tuple[str, list]]:
    """(name, spec) of every input of a node type, required first, in the server's declared order."""
    order = node_info.get("input_order") or {group: list(node_info["input"].get(group, {}))
                                             for group in ("required", "optional")}
    return [(name, node_info["input"][group][name]) for group in ("required", "optional")
            for name in order.get(group, [])]


def input_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def is_widget(spec: list) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return input_type(spec) in WIDGET_TYPES and not options.get("forceInput")


def widget_value_count(spec: list) -> int:
    """How many entries of widgets_values the input takes: its value, plus the editor's control value if any."""
    options = spec[1] if len(spec) > 1 else {}
    return 2 if options.get("control_after_generate") else 1


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of an editor-format workflow: {node id: {class_type, inputs}} for every active node."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in EDITOR_ONLY_TYPES:
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node {node['id']} has type {node['type']}, which the server does not know: install the "
                           "node pack that provides it")
        if node.get("mode", ACTIVE_MODE) != ACTIVE_MODE:
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed; only active nodes convert")
        linked = {entry["name"]: links[entry["link"]] for entry in node.get("inputs", [])
                  if entry.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in ordered_inputs(object_info[node["type"]]):
            if is_widget(spec):
                count = widget_value_count(spec)
                if len(values) < count:
                    raise ValueError(f"node {node['id']} ({node['type']}) has too few widget values for '{name}'")
                inputs[name] = values[0]
                values = values[count:]
            if name in linked:  # a widget turned into a socket keeps its stored value; the link wins
                _, from_node, from_slot, _, _, _ = linked[name]
                inputs[name] = [str(from_node), from_slot]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} widget values more than its type "
                             "declares: the workflow was saved with another version of that node")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def replace_inputs(prompt: dict, replacements: dict[str, dict]) -> dict:
    """A copy of ``prompt`` with inputs replaced by node title: {title: {input name: value}} (for example the model
    file names of another machine). Every title must name exactly one node, so a renamed node fails loudly."""
    changed = copy.deepcopy(prompt)
    for title, values in replacements.items():
        matches = [node for node in changed.values() if node["_meta"]["title"] == title]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} nodes titled '{title}' in the workflow (expected one)")
        unknown = set(values) - set(matches[0]["inputs"])
        if unknown:
            raise KeyError(f"node '{title}' has no inputs {sorted(unknown)}")
        matches[0]["inputs"].update(values)
    return changed
