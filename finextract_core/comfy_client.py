"""A ComfyUI server driven over its HTTP API, and a server started on 127.0.0.1 for a run.

Standard library only and no ComfyUI import: the audit command (finextract_core.audit) runs in a plain process beside
any ComfyUI, and the host tooling (tools/host/comfy_server.py) starts its test servers with the same launcher and
talks to them with the same client.

The API (ComfyUI's server.py): ``POST /prompt`` queues an API-format graph under a prompt id the client may choose,
``GET /history/<id>`` holds it once it has finished or failed (with every output node's UI values), ``GET /queue``
lists what is running and pending, ``GET /view`` returns a file of the output folder, ``GET /system_stats`` answers
once the server is up (and names the arguments it was started with). A server runs one prompt at a time.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

READY_TIMEOUT = 180.0  # ComfyUI imports torch and every custom node before it answers: seconds on a GPU box, minutes
REQUEST_TIMEOUT = 30.0
POLL_SECONDS = 0.5
FIRST_POLL_SECONDS = 0.02  # a prompt ComfyUI answers from its cache is done within milliseconds
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ServerUnavailable(ConnectionError):
    """The server does not answer (it stopped, is restarting, or the network is down)."""


class ServerExited(RuntimeError):
    """The ComfyUI process ended before it answered: its log says why."""


class PromptRejected(RuntimeError):
    """ComfyUI refused to queue the prompt (it names the node and input that failed validation)."""


def execution_error(entry: dict) -> str | None:
    """ComfyUI's error message for a finished prompt's history entry, or None if it succeeded."""
    if entry["status"].get("status_str") != "error":
        return None
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
        if kind == "execution_interrupted":
            return f"{data.get('node_type')}: interrupted"
    return "unknown error"


def rejection_message(body: str) -> str:
    """The readable part of POST /prompt's 400 answer: the error and each failing node's errors."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.strip()
    lines = [str((answer.get("error") or {}).get("message", "")).strip()]
    for node_id, node in sorted((answer.get("node_errors") or {}).items()):
        for error in node.get("errors", []):
            lines.append(f"node {node_id} ({node.get('class_type')}): {error.get('message')}: {error.get('details')}")
    return "; ".join(line for line in lines if line) or body.strip()


class ComfyClient:
    """One ComfyUI server at ``url``. Every call raises ServerUnavailable when the server does not answer."""

    def __init__(self, url: str, client_id: str | None = None, timeout: float = REQUEST_TIMEOUT):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout

    def _request(self, path: str, payload: dict | None = None) -> bytes:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            if path == "/prompt" and error.code == 400:
                raise PromptRejected(f"POST /prompt answered 400: {rejection_message(body)}") from error
            raise RuntimeError(f"{'POST' if data else 'GET'} {path} answered {error.code}: {body[:2000]}") from error
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as error:
            raise ServerUnavailable(f"ComfyUI at {self.url} does not answer ({error})") from error

    def get(self, path: str):
        return json.loads(self._request(path))

    def get_bytes(self, path: str) -> bytes:
        return self._request(path)

    def post(self, path: str, payload: dict):
        return json.loads(self._request(path, payload) or b"null")

    def ready(self) -> bool:
        try:
            self.get("/system_stats")
            return True
        except ServerUnavailable:
            return False

    def queue(self, prompt: dict, prompt_id: str | None = None) -> str:
        """Queues ``prompt`` (under ``prompt_id`` when given, so it can be found again after a reconnect). A prompt
        some of whose output nodes failed validation is taken off the queue again and refused: ComfyUI would run the
        others and skip the failed ones without an error in the history."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if prompt_id is not None:
            payload["prompt_id"] = prompt_id
        answer = self.post("/prompt", payload)
        if answer.get("node_errors"):
            self.post("/queue", {"delete": [answer["prompt_id"]]})
            raise PromptRejected(f"POST /prompt refused some output nodes: {rejection_message(json.dumps(answer))}")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The prompt's history entry once it has finished or failed, else None."""
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def in_queue(self, prompt_id: str) -> bool:
        """Whether the prompt is running or waiting on this server."""
        queue = self.get("/queue")
        return any(item[1] == prompt_id for item in queue.get("queue_running", []) + queue.get("queue_pending", []))

    def wait(self, prompt_id: str, timeout: float | None = None, on_progress=None, alive=None) -> dict:
        """The prompt's history entry once it has finished (successfully or not). ``alive()`` (a server process
        check) is asked at every poll: False raises ServerUnavailable at once instead of waiting for the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = FIRST_POLL_SECONDS
        while deadline is None or time.monotonic() < deadline:
            if alive is not None and not alive():
                raise ServerUnavailable(f"the ComfyUI server at {self.url} exited while running prompt {prompt_id}")
            entry = self.history(prompt_id)
            if entry is not None:
                return entry
            if on_progress:
                on_progress()
            time.sleep(pause)
            pause = min(2 * pause, POLL_SECONDS)  # quick answers for short prompts, few requests for long ones
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt: dict, timeout: float | None = None, on_progress=None, alive=None) -> dict:
        return self.wait(self.queue(prompt), timeout, on_progress, alive)

    def view(self, filename: str, subfolder: str = "", folder_type: str = "output") -> bytes:
        """A file the server wrote (its output folder by default), as bytes."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        return self.get_bytes(f"/view?{query}")


# ------------------------------------------------------------------------------------------------- a local server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _die_with_parent() -> None:
    """In the child before exec (Linux): the kernel kills the server when the process that started it dies, even by
    SIGKILL, so a killed run never leaves a server writing into the bank the next run resumes. Elsewhere the next
    run stops it (stop_recorded_server)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def find_comfyui(pack_folder: str) -> str | None:
    """The ComfyUI tree a pack folder is installed in (``<ComfyUI>/custom_nodes/<pack>``), or None."""
    custom_nodes = os.path.dirname(os.path.abspath(pack_folder))
    root = os.path.dirname(custom_nodes)
    if os.path.basename(custom_nodes) == "custom_nodes" and os.path.isfile(os.path.join(root, "main.py")):
        return root
    return None


class ComfyProcess:
    """A ComfyUI server this program starts on 127.0.0.1 (``python main.py`` in ``comfy_root`` with ``arguments``)
    and stops; ``restart`` starts it again on a new port. Its output goes to ``log_path``."""

    def __init__(self, comfy_root: str, python: str, arguments: list[str] | tuple[str, ...], log_path: str,
                 env: dict[str, str] | None = None, ready_timeout: float = READY_TIMEOUT):
        if not os.path.isfile(os.path.join(comfy_root, "main.py")):
            raise FileNotFoundError(f"'{comfy_root}' holds no ComfyUI (no main.py): give the folder of your ComfyUI")
        self.comfy_root = comfy_root
        self.python = python
        self.arguments = list(arguments)
        self.log_path = log_path
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> ComfyClient:
        """Starts the server and waits until it answers; returns a client for it."""
        self.port = free_port()
        self.starts += 1
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "a" if self.starts > 1 else "w") as log:
            if self.starts > 1:
                log.write(f"\n----- ComfyUI started again (start {self.starts}) -----\n")
            log.flush()
            self.process = subprocess.Popen(
                [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                 *self.arguments],
                cwd=self.comfy_root, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        client = ComfyClient(self.url)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExited(f"ComfyUI exited during start-up; see {self.log_path}:\n{self.log_tail()}")
            if client.ready():
                return client
            time.sleep(POLL_SECONDS)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.ready_timeout:.0f} s; see {self.log_path}")

    def restart(self) -> ComfyClient:
        self.stop()
        return self.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_process_group(self.process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "ComfyProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def record_server(state_file: str, process: ComfyProcess, marker: str) -> None:
    """Notes the running server's pid and port (and the argument that marks it as this run's) in ``state_file``."""
    with open(state_file + ".tmp", "w") as f:
        json.dump({"pid": process.process.pid, "port": process.port, "marker": marker}, f, sort_keys=True)
    os.replace(state_file + ".tmp", state_file)


def stop_recorded_server(state_file: str) -> bool:
    """Stops a server an earlier run started and left running (killed where the kernel does not stop its children):
    only if the process still answers on the recorded port with the recorded marker among its arguments (ComfyUI
    lists them in /system_stats), so an unrelated process that got the same pid is never touched."""
    try:
        with open(state_file) as f:
            state = json.load(f)
        argv = ComfyClient(f"http://127.0.0.1:{int(state['port'])}", timeout=5).get("/system_stats")["system"]["argv"]
    except (OSError, ValueError, KeyError, TypeError, ServerUnavailable, RuntimeError):
        return False
    if state.get("marker") not in argv:
        return False
    try:
        os.killpg(int(state["pid"]), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
