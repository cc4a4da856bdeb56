"""Declared dependencies are the ones imported: what the product (the entry point, nodes/, finextract_core/) imports at
module level, beyond ComfyUI and what ComfyUI itself requires, is exactly requirements.txt and pyproject's
dependencies; what it imports only inside a function is an optional extra; what only the tests use is a dev
requirement; and the host bootstrap installs both files."""
import ast
import importlib.metadata
import os
import re
import sys
import tomllib

from fixtures.source_imports import absolute_imports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ComfyUI's own modules, which the nodes import from the host.
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfyui_version", "folder_paths",
                   "latent_preview", "nodes", "node_helpers", "server"}
# Installed with ComfyUI (its requirements.txt), so the pack does not declare them (requirements.txt says so).
COMFYUI_PROVIDES = {"torch", "torchvision", "numpy", "safetensors", "pillow"}
DISTRIBUTIONS = {"PIL": "pillow", "open_clip": "open-clip-torch"}  # import name -> distribution, where they differ


def product_files() -> list[str]:
    files = [os.path.join(ROOT, "__init__.py")]
    for folder in ("nodes", "finextract_core"):
        for directory, _, names in sorted(os.walk(os.path.join(ROOT, folder))):
            files += sorted(os.path.join(directory, name) for name in names if name.endswith(".py"))
    return files


def third_party_imports() -> tuple[set[str], set[str]]:
    """(distributions imported at module level, distributions imported only inside functions) by the product."""
    module_level, in_functions = set(), set()
    for path in product_files():
        tree = ast.parse(open(path).read(), path)
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(node) for function in functions for node in ast.walk(function)}
        for node, name in absolute_imports(tree):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in COMFYUI_MODULES:
                continue
            (in_functions if id(node) in nested else module_level).add(DISTRIBUTIONS.get(top, top).lower())
    return module_level, in_functions - module_level


def requirement_names(lines) -> set[str]:
    return {re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower() for line in lines
            if line.strip() and not line.strip().startswith("#")}


def read_lines(name: str) -> list[str]:
    with open(os.path.join(ROOT, name)) as handle:
        return handle.read().splitlines()


def test_declared_dependencies_are_the_imported_ones():
    module_level, optional = third_party_imports()
    required = module_level - COMFYUI_PROVIDES
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    assert required == {"scipy"}, f"the product imports {sorted(required)} at module level beyond ComfyUI's"
    assert requirement_names(read_lines("requirements.txt")) == required
    assert requirement_names(project["dependencies"]) == required
    extras = project["optional-dependencies"]
    assert optional == {"open-clip-torch", "ray"}
    assert requirement_names(extras["clip"]) == {"open-clip-torch"} and requirement_names(extras["cluster"]) == {"ray"}
    dev = requirement_names(read_lines("requirements-dev.txt"))
    assert dev == requirement_names(project["optional-dependencies"]["dev"])
    assert "networkx" in dev and "networkx" not in module_level | optional, "networkx is for the tests only"
    assert optional <= dev, "the optional nodes are tested"


def test_the_host_installs_what_is_declared():
    bootstrap = open(os.path.join(ROOT, "tools", "host", "bootstrap_host.sh")).read()
    assert '-r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"' in bootstrap
    for name in requirement_names(read_lines("requirements.txt") + read_lines("requirements-dev.txt")):
        assert importlib.metadata.version(name), name  # raises PackageNotFoundError when the host lacks it
    # The host's own list (ComfyUI's requirements) agrees: every product requirement is one of ComfyUI's too.
    assert requirement_names(read_lines("requirements.txt")) <= requirement_names(
        read_lines(os.path.join("tools", "host", "requirements.txt")))
