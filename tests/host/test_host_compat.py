"""The pack on whichever ComfyUI the suite runs against (CI: 0.3.75; by hand, a current tree through FINEXTRACT_COMFYUI,
docs/compatibility.md): the start-up version check and the table it is checked against, a tree that imports a module
its Python lacks, every sampler's step noise classified by what ComfyUI itself draws, the pack's imports with
<ComfyUI>/comfy off sys.path, model-config reads in the family checks, and progress bars that end at their total.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fixtures import tiny_models
from fixtures.source_imports import absolute_imports
from tools.host.comfy_server import REPO_ROOT, ComfyServer, read_host_env

PRODUCT = ("__init__.py", "nodes", "finextract_core")  # what users install, besides web/ and workflows/
COMPATIBILITY_TABLE = os.path.join(REPO_ROOT, "docs", "compatibility.md")


@pytest.fixture(scope="module")
def models(host, tmp_path_factory):
    """Random-weight SD 1.x-shaped MODELs (UNet only), loaded by ComfyUI: a base and a fine-tune of it."""
    import comfy.sd

    folder = tmp_path_factory.mktemp("compat")
    weights = tiny_models.sd15_unet(seed=1)
    return [comfy.sd.load_diffusion_model(tiny_models.save_unet(str(folder / name), unet))
            for name, unet in (("base.safetensors", weights),
                               ("fine_tune.safetensors", tiny_models.fine_tune_of(weights, seed=2)))]


@pytest.fixture(scope="module")
def unet(models):
    return models[0]


def empty_conditioning():
    return [[torch.zeros(1, 77, 768), {}]]


# ------------------------------------------------------------------------------------------ version at start-up
def versions_in_compatibility_table() -> list[str]:
    """The ComfyUI versions in the first column of docs/compatibility.md's table."""
    with open(COMPATIBILITY_TABLE, encoding="utf-8") as f:
        return re.findall(r"^\|\s*(\d+\.\d+\.\d+)\s*\|", f.read(), flags=re.MULTILINE)


def test_the_oldest_tested_version_is_the_oldest_in_the_compatibility_table(host):
    listed = versions_in_compatibility_table()
    assert listed, f"no ComfyUI version in the table of {COMPATIBILITY_TABLE}"
    assert host.pack.OLDEST_TESTED_COMFYUI == min(listed, key=host.pack.release)


def test_the_version_check_orders_releases_by_number(host):
    pack = host.pack
    assert host.comfyui_version and pack.version_warning(host.comfyui_version) is None
    assert pack.release("0.3.75") == (0, 3, 75) and pack.release("0.33.0rc1") == (0, 33, 0)
    # 0.10 is newer than 0.3 although "0.10" < "0.3" as text.
    assert pack.version_warning("0.10.0") is None and pack.version_warning(pack.OLDEST_TESTED_COMFYUI) is None
    older = pack.version_warning("0.3.9")
    assert "0.3.9" in older and pack.OLDEST_TESTED_COMFYUI in older and "update ComfyUI" in older
    assert "does not say which version" in pack.version_warning(None)


def test_an_older_comfyui_is_told_at_start_up(host):
    """The pack loaded by ComfyUI's own loader into a process whose comfyui_version says 0.3.9 logs the warning."""
    script = ("import sys, types; sys.modules['comfyui_version'] = types.SimpleNamespace(__version__='0.3.9'); "
              "from tools.host.comfy_inprocess import load_host; load_host()")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ComfyUI 0.3.9 is older than {host.pack.OLDEST_TESTED_COMFYUI}" in done.stderr, done.stderr[-3000:]


# ----------------------------------------------------------------------------------- a module the venv lacks
HIDING_SITECUSTOMIZE = '''import sys


class HideModule:
    """This Python, as if {module!r} were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, HideModule())
'''


def python_without(module: str, folder) -> dict[str, str]:
    """Environment variables under which this host's Python cannot import ``module`` (a sitecustomize that hides it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HIDING_SITECUSTOMIZE.format(module=module))
    return {"PYTHONPATH": str(folder)}


def bootstrap(host_dir, **env) -> subprocess.CompletedProcess:
    """tools/host/bootstrap_host.sh for this host's ComfyUI and Python, as its user would run it, into host_dir."""
    settings = read_host_env()
    env = dict(os.environ, FINEXTRACT_HOST_DIR=str(host_dir), FINEXTRACT_COMFYUI=settings["FINEXTRACT_COMFYUI"],
               FINEXTRACT_PYTHON=sys.executable, **env)
    env.pop("FINEXTRACT_BASE", None)
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "host", "bootstrap_host.sh")], env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_second_host_dir_is_a_host_of_its_own(host, tmp_path):
    """Bring your own ComfyUI into another host dir: its check passes, and FINEXTRACT_HOST_DIR alone finds its base."""
    done = bootstrap(tmp_path / "second")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"loads the pack in {sys.executable}" in done.stdout
    env = {name: value for name, value in os.environ.items() if not name.startswith("FINEXTRACT_")}
    script = "import json; from tools.host.comfy_server import read_host_env; print(json.dumps(read_host_env()))"
    found = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                           env=dict(env, FINEXTRACT_HOST_DIR=str(tmp_path / "second"))).stdout
    assert json.loads(found) == {"FINEXTRACT_COMFYUI": read_host_env()["FINEXTRACT_COMFYUI"],
                                 "FINEXTRACT_PYTHON": sys.executable,
                                 "FINEXTRACT_BASE": str(tmp_path / "second" / "base")}


@pytest.mark.parametrize("module", ["torchsde", "torchaudio"])
def test_bootstrap_names_a_module_the_tree_imports_and_the_python_lacks(host, tmp_path, module):
    """Bring your own ComfyUI: bootstrap's check names the module, the Python and the requirements to install."""
    done = bootstrap(tmp_path / "host", **python_without(module, tmp_path / "hide"))
    if done.returncode == 0 and module == "torchaudio":
        pytest.skip("this ComfyUI loads without torchaudio (older trees import it for their audio nodes only)")
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    requirements = os.path.join(read_host_env()["FINEXTRACT_COMFYUI"], "requirements.txt")
    assert f"imports {module!r}, which {sys.executable} does not have" in last and requirements in last, last
    assert not (tmp_path / "host" / ".checked").exists(), "a failed check must be repeated next time"


def test_a_server_that_cannot_start_names_the_missing_module(host, tmp_path, monkeypatch):
    for name, value in python_without("torchsde", tmp_path / "hide").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=r"exited during start-up: the ComfyUI at .* imports 'torchsde', which "
                       r".* does not have: install that tree's requirements"):
        with ComfyServer(str(tmp_path / "base"), lab=False):
            pass


# --------------------------------------------------------------------------------------- samplers' step noise
def brownian_motions_built(monkeypatch) -> list:
    """From here on, one entry per Brownian motion torchsde builds (ComfyUI's BrownianTreeNoiseSampler builds one)."""
    import torchsde

    built = []
    build = torchsde.BrownianInterval.__init__

    def recording(self, *args, **kwargs):
        built.append(self)
        build(self, *args, **kwargs)

    monkeypatch.setattr(torchsde.BrownianInterval, "__init__", recording)
    return built


def test_every_sampler_gets_the_kind_of_step_noise_comfyui_draws_for_it(host, unet, monkeypatch):
    """Each of the host's samplers runs with its own default noise: those that draw from a Brownian tree must get
    one Brownian tree per candidate in the bank, all others independent draws per candidate."""
    import comfy.sample
    import comfy.samplers
    from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler

    bank = host.module("nodes.bank")
    step_noise_kind = host.module("finextract_core.bank").CandidateStepNoise
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    built = brownian_motions_built(monkeypatch)
    from_a_tree = set()
    for name in comfy.samplers.SAMPLER_NAMES:
        built.clear()
        comfy.sample.sample(unet, noise, 3, 1.0, name, "normal", empty_conditioning(), empty_conditioning(),
                            torch.zeros_like(noise), seed=0, disable_pbar=True)
        if built:
            from_a_tree.add(name)
    assert from_a_tree and from_a_tree != set(comfy.samplers.SAMPLER_NAMES), from_a_tree
    for name in comfy.samplers.SAMPLER_NAMES:
        given = bank.candidate_step_noise(name, 7, [0, 1], (4, 8, 8), unet)
        expected = BrownianTreeNoiseSampler if name in from_a_tree else step_noise_kind
        drawn = "from a Brownian tree" if name in from_a_tree else "independent noise"
        assert type(given) is expected, f"{name}: ComfyUI draws {drawn}, the bank gives {type(given).__name__}"


# ---------------------------------------------------------------------------------- what the pack reads of ComfyUI
def test_the_pack_imports_no_module_of_comfy_as_a_top_level_name(host):
    """Current trees put <ComfyUI>/comfy on sys.path only while custom nodes load, older ones from nodes.py's import
    on: a pack module imported as ``import sd`` or ``from utils import ...`` would find another module, or none."""
    comfy_folder = os.path.join(read_host_env()["FINEXTRACT_COMFYUI"], "comfy")
    comfy_names = {os.path.splitext(name)[0] for name in os.listdir(comfy_folder)
                   if name.endswith(".py") or os.path.isdir(os.path.join(comfy_folder, name))}
    found = []
    for part in PRODUCT:
        path = os.path.join(REPO_ROOT, part)
        files = [path] if path.endswith(".py") else [os.path.join(folder, name) for folder, _, names in os.walk(path)
                                                      for name in names if name.endswith(".py")]
        for file in files:
            with open(file, encoding="utf-8") as f:
                tree = ast.parse(f.read(), file)
            found += [(os.path.relpath(file, REPO_ROOT), name) for _, name in absolute_imports(tree)
                      if name.split(".")[0] in comfy_names]
    assert found == [], "import these as comfy.<name>"


def test_family_checks_read_only_what_model_configs_have(host, unet, monkeypatch):
    """Current ComfyUI answers a read of a missing model-config attribute with None and a warning (older ones raise):
    the family checks must not rely on either. Every such read is recorded here, on any host."""
    import comfy.supported_models_base

    base_class = comfy.supported_models_base.BASE
    fallback = base_class.__dict__.get("__getattr__")
    missing = []

    def recording(self, name):
        missing.append(name)
        if fallback is None:
            raise AttributeError(name)
        return fallback(self, name)

    monkeypatch.setattr(base_class, "__getattr__", recording, raising=False)
    guider = host.module("nodes.guider")
    sdxl, _ = tiny_models.sdxl_patcher(seed=21)
    guider.check_same_family(unet, unet.clone())
    with pytest.raises(guider.ModelPairError, match="different model families"):
        guider.check_same_family(unet, sdxl)
    assert missing == [], f"the family checks read model-config attributes that do not exist: {missing}"


def test_the_samplers_progress_bar_ends_at_its_total(host, models, monkeypatch):
    """ComfyUI may drop intermediate progress updates (current trees throttle them): nothing may count them, but the
    last one must say the node is done."""
    import comfy.utils

    shown = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        shown.append((value, total)))
    sampler = host.nodes.NODE_CLASS_MAPPINGS["FineXtractModelGuidanceSampler"]
    steps = 3
    pretrained, fine_tuned = models
    sampler.execute(fine_tuned, pretrained, empty_conditioning(), empty_conditioning(), "finextract", 3.0, 0.0,
                    {"samples": torch.zeros(1, 4, 8, 8)}, 0, steps, "euler", "normal", 1.0)
    assert shown and shown[-1] == (steps, steps), shown
