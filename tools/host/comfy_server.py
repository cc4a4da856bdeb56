"""Start a real ComfyUI server on 127.0.0.1, queue API-format workflows on it over HTTP, and stop it.

Used by the end-to-end tests and the demo. Standard library only, so it runs under any Python.

A server's base directory links the pack in as ``custom_nodes/finextract`` and, unless asked not to, the lab as
``lab_nodes/finextract_lab``: a second custom-node folder (named in the base's extra_model_paths.yaml) that ComfyUI
scans after the first, so the lab's nodes always find the pack already loaded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

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


def stop_process_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to a process started with start_new_session=True and its children; SIGKILL if it outlives timeout."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(base) as server: server.run(prompt)``; the process is always stopped on exit."""

    def __init__(self, base: str, log_path: str | None = None, ready_timeout: float = 180.0, lab: bool = True):
        settings = read_host_env()
        self.comfy_root = settings.get("FINEXTRACT_COMFYUI", "")
        self.python = settings.get("FINEXTRACT_PYTHON", sys.executable)
        if not os.path.exists(os.path.join(self.comfy_root, "main.py")):
            raise RuntimeError("No ComfyUI host: run tools/host/bootstrap_host.sh (or set FINEXTRACT_COMFYUI)")
        self.base = prepare_base_directory(base, lab=lab)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(self.base, "comfyui.log")
        self.ready_timeout = ready_timeout
        self.process = None
        self.client_id = uuid.uuid4().hex

    def __enter__(self) -> "ComfyServer":
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", self.base, "--database-url", "sqlite:///:memory:",
             "--extra-model-paths-config", os.path.join(self.base, EXTRA_PATHS)],
            cwd=self.comfy_root, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up; see {self.log_path}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.ready_timeout} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, timeout=30)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"POST {path} answered {error.code}: {error.read().decode()}") from error

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0, on_progress=None) -> dict:
        """The prompt's history entry once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # ComfyUI files a prompt in its history once it has finished or failed
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            if on_progress:
                on_progress()
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt: dict, timeout: float = 600.0, on_progress=None) -> dict:
        return self.wait(self.queue(prompt), timeout, on_progress)


def execution_error(entry: dict) -> str | None:
    """ComfyUI's error message for a failed prompt, or None if it succeeded."""
    if entry["status"].get("status_str") != "error":
        return None
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
    return "unknown error"


def saved_images(entry: dict, base: str) -> list[str]:
    """Paths of every image the prompt saved, in node order."""
    paths = []
    for node_id in sorted(entry.get("outputs", {}), key=lambda n: int(n) if n.isdigit() else n):
        for image in entry["outputs"][node_id].get("images", []):
            if image.get("type") == "output":
                paths.append(os.path.join(base, "output", image.get("subfolder", ""), image["filename"]))
    return paths
