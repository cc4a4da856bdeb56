"""Start a real ComfyUI server on 127.0.0.1 for a test or the demo, queue API-format workflows on it over HTTP, and
stop it: the product's own launcher and HTTP client (finextract_core/comfy_client.py) with this checkout's host
(tools/host/bootstrap_host.sh) and base directory. Standard library only, so it runs under any Python.

A server's base directory links the pack in as ``custom_nodes/finextract`` and, unless asked not to, the lab as
``lab_nodes/finextract_lab``: a second custom-node folder (named in the base's extra_model_paths.yaml) that ComfyUI
scans after the first, so the lab's nodes always find the pack already loaded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import ModuleType

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_FOLDER = "finextract"
LAB_FOLDER = "finextract_lab"
LAB_NODES = "lab_nodes"  # the base directory's second custom_nodes folder, holding only the lab
EXTRA_PATHS = "extra_model_paths.yaml"


def read_host_env() -> dict[str, str]:
    """The host written by tools/host/bootstrap_host.sh, overridden by FINEXTRACT_* environment variables."""
    settings = {}
    env_file = os.path.join(os.environ.get("FINEXTRACT_HOST_DIR") or os.path.join(REPO_ROOT, ".host"), "host.env")
    if os.path.exists(env_file):
        with open(env_file) as f:
            settings.update(line.strip().split("=", 1) for line in f if "=" in line)
    for key in ("FINEXTRACT_COMFYUI", "FINEXTRACT_PYTHON", "FINEXTRACT_BASE"):
        if os.environ.get(key):
            settings[key] = os.environ[key]
    return settings


def missing_module_advice(comfy_root: str, python: str, module: str) -> str:
    """What to do when the ComfyUI tree at comfy_root imports ``module`` and the Python it runs under lacks it."""
    advice = (f"the ComfyUI at {comfy_root} imports {module!r}, which {python} does not have: install that tree's "
              f"requirements into it ({python} -m pip install -r {os.path.join(comfy_root, 'requirements.txt')})")
    if module == "torchaudio":  # imported with comfy.sd in current trees; PyPI may have none built for your torch
        advice += ("; where pip finds no torchaudio built for your torch, an older one may import beside it: "
                   "`pip install --no-deps torchaudio==2.11.1` runs beside torch 2.14.1")
    return advice


def missing_module_in_log(log: str) -> str | None:
    """The module a failed start-up could not import, from the traceback in ComfyUI's log."""
    found = re.findall(r"ModuleNotFoundError: No module named '([\w.]+)'", log)
    return found[-1].split(".")[0] if found else None


def _link(target: str, link: str) -> None:
    if not os.path.islink(link) and not os.path.exists(link):
        os.symlink(target, link)


def prepare_base_directory(base: str, lab: bool = True) -> str:
    """A ComfyUI --base-directory with this checkout linked in as custom_nodes/finextract, and the lab after it
    (``lab=False``: the pack alone, as users have it)."""
    for sub in ("custom_nodes", LAB_NODES, "models/checkpoints", "models/diffusion_models", "models/loras", "input",
                "output", "user"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    _link(REPO_ROOT, os.path.join(base, "custom_nodes", PACK_FOLDER))
    lab_link = os.path.join(base, LAB_NODES, LAB_FOLDER)
    if lab:
        _link(os.path.join(REPO_ROOT, "lab"), lab_link)
    elif os.path.islink(lab_link):
        os.remove(lab_link)
    with open(os.path.join(base, EXTRA_PATHS), "w") as f:
        f.write(f"finextract_lab:\n  base_path: {base}\n  custom_nodes: {LAB_NODES}\n")
    return base


def product_client() -> ModuleType:
    """The product's HTTP client and server launcher (finextract_core.comfy_client), as this process holds the pack:
    ComfyUI's copy where the host is loaded in-process (tests/host), else this checkout's core. Looked up when first
    needed, since this module is imported before the host is loaded."""
    from lab.product import pack_module

    return pack_module("finextract_core.comfy_client")


def stop_process_group(process: subprocess.Popen, timeout: float) -> None:
    product_client().stop_process_group(process, timeout)


def execution_error(entry: dict) -> str | None:
    """ComfyUI's error message for a failed prompt, or None if it succeeded."""
    return product_client().execution_error(entry)


class ComfyServer:
    """``with ComfyServer(base) as server: server.run(prompt)``; the process is always stopped on exit."""

    def __init__(self, base: str, log_path: str | None = None, ready_timeout: float = 180.0, lab: bool = True,
                 options: tuple[str, ...] = ()):
        settings = read_host_env()
        comfy_root = settings.get("FINEXTRACT_COMFYUI", "")
        if not os.path.exists(os.path.join(comfy_root, "main.py")):
            raise RuntimeError("No ComfyUI host: run tools/host/bootstrap_host.sh (or set FINEXTRACT_COMFYUI)")
        self.base = prepare_base_directory(base, lab=lab)
        self.log_path = log_path or os.path.join(self.base, "comfyui.log")
        # options: more of main.py's options, such as ("--front-end-root", folder)
        arguments = [*host_server_arguments(self.base), *options]
        self.launcher = product_client().ComfyProcess(
            comfy_root, settings.get("FINEXTRACT_PYTHON", sys.executable), arguments, self.log_path,
            env={"OMP_NUM_THREADS": "1"}, ready_timeout=ready_timeout)
        self.client = None  # a ComfyClient once the server runs

    @property
    def process(self) -> subprocess.Popen | None:
        return self.launcher.process

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def client_id(self) -> str:
        return self.client.client_id

    def __enter__(self) -> "ComfyServer":
        try:
            self.client = self.launcher.start()
        except product_client().ServerExited as error:  # a server that only timed out keeps its own message
            with open(self.log_path) as f:
                missing = missing_module_in_log(f.read())
            if missing is None:
                raise
            raise RuntimeError(f"ComfyUI exited during start-up: "
                               f"{missing_module_advice(self.launcher.comfy_root, self.launcher.python, missing)}; "
                               f"see {self.log_path}:\n{self.launcher.log_tail()}") from error
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.launcher.stop()

    def log_tail(self, lines: int = 40) -> str:
        return self.launcher.log_tail(lines)

    def get(self, path: str):
        return self.client.get(path)

    def post(self, path: str, payload: dict):
        return self.client.post(path, payload)

    def queue(self, prompt: dict) -> str:
        return self.client.queue(prompt)

    def wait(self, prompt_id: str, timeout: float = 600.0, on_progress=None) -> dict:
        """The prompt's history entry once it has finished (successfully or not)."""
        try:
            return self.client.wait(prompt_id, timeout, on_progress, alive=self.launcher.alive)
        except product_client().ServerUnavailable as error:
            raise RuntimeError(f"ComfyUI died while running the prompt ({error}):\n{self.log_tail()}") from error

    def run(self, prompt: dict, timeout: float = 600.0, on_progress=None) -> dict:
        return self.wait(self.queue(prompt), timeout, on_progress)


def host_server_arguments(base: str) -> list[str]:
    """main.py's options for a test server: the CPU, the base directory, no database on disk, the lab's nodes."""
    return ["--cpu", "--base-directory", base, "--database-url", "sqlite:///:memory:",
            "--extra-model-paths-config", os.path.join(base, EXTRA_PATHS)]


def saved_images(entry: dict, base: str) -> list[str]:
    """Paths of every image the prompt saved, in node order."""
    paths = []
    for node_id in sorted(entry.get("outputs", {}), key=lambda n: int(n) if n.isdigit() else n):
        for image in entry["outputs"][node_id].get("images", []):
            if image.get("type") == "output":
                paths.append(os.path.join(base, "output", image.get("subfolder", ""), image["filename"]))
    return paths
