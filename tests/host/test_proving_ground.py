"""The proving ground end to end on a tiny world inside the real host: one concept of two images, both fine-tune styles,
every method, caption recovery and the Table 7 rows; the same seeds give the same figures on a second run, which adds
a second seed."""
import dataclasses
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.tiny_world import TINY_WORLD as TINY
from lab import proving_ground
from lab.world import store, training
from lab.world.caption import WORD_IDS
from lab.world.text import tokenize
from tools.host.comfy_server import REPO_ROOT

N0 = 2
STYLES = ("dreambooth", "lora", "locon")


def save_noise_images(folder, count: int) -> None:
    """``count`` noise PNGs named 0.png, 1.png, ...: 40x48, not square, so loading crops and resizes them."""
    folder.mkdir()
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def runs(host, tmp_path_factory):
    root = tmp_path_factory.mktemp("proving_ground")
    store.build_or_load(str(root / "world"), TINY)
    images = root / "images"
    save_noise_images(images, N0 + 1)  # a third file that the split leaves out
    # Short caps keep the test quick; the rule (train to a memorisation target) is the one the defaults use.
    saved = training.STRENGTHS
    training.STRENGTHS = {style: {name: dataclasses.replace(settings, steps=50) for name, settings in by_name.items()}
                          for style, by_name in saved.items()}
    try:
        reports = []
        for attempt, seeds in (("first", []), ("again", ["--seeds", "0,1"])):
            out = root / attempt
            proving_ground.main(["--world", str(root / "world"), "--images", str(images), "--concepts", "1",
                                 "--n0", str(N0), "--steps", "2", "--methods", "all", "--styles", ",".join(STYLES),
                                 "--out", str(out), *seeds])
            with open(out / "results.json") as handle:
                reports.append((json.load(handle), out))
    finally:
        training.STRENGTHS = saved
    return reports


def test_every_method_is_clustered_to_n0_and_scored_with_its_caption(runs):
    report, out = runs[0]
    assert report["settings"]["n_candidates"] == 50 * N0
    concept = report["concepts"][0]
    assert concept["caption"] == "a sks photo" and concept["images"] == ["0.png", "1.png"]
    for style, block in concept["styles"].items():
        methods = block["methods"]
        assert {m["caption"] for m in methods.values()} == {"true", "recovered", "empty"}
        for name, method in methods.items():
            assert method["caption"] == ("recovered" if name.startswith("recovered caption")
                                         else "empty" if name.startswith("no caption") else "true")
            assert len(method["clusters"]["centres"]) == N0 and len(method["per_reference"]) == N0
            assert -1 <= method["AS"] <= method["best_of_all_candidates"]["AS"] <= 1
            assert 0 <= method["saturation"] <= 1
        # ComfyUI's RescaleCFG patch runs in rows of its own, on the default scales, and changes what is sampled.
        for mode in ("cfg", "finextract"):
            (patched,) = [m for m in methods.values() if m["mode"] == mode and m["rescale_cfg"]]
            (plain,) = [m for m in methods.values() if m["mode"] == mode and not m["rescale_cfg"]
                        and m["caption"] == "true" and m["scale"] == patched["scale"]]
            assert patched["rescale_cfg"] == proving_ground.RESCALE_CFG_MULTIPLIER
            assert patched["per_reference"] != plain["per_reference"], f"{style} {mode}: RescaleCFG changed nothing"
    figure = Image.open(out / "extraction.png")
    rows = 2 + sum(len(b["methods"]) for b in concept["styles"].values())
    assert figure.size[1] == rows * (64 + 4)


def test_the_default_methods_are_the_papers_table_1_and_all_adds_the_patched_table_7_and_no_caption_rows(host):
    from lab.product import pack_module

    def methods(argv: list[str], style: str) -> list[proving_ground.Method]:
        ground = types.SimpleNamespace(args=proving_ground.parse_args(argv),
                                       guidance=pack_module("finextract_core.guidance"))
        return proving_ground.ProvingGround.methods(ground, style)

    paper = methods([], "lora")
    assert [(m.mode, m.scale, m.caption, m.rescale_cfg) for m in paper] == [
        ("direct", 1.0, "true", 0.0), ("cfg", 3.0, "true", 0.0), ("finextract", 5.0, "true", 0.0)]
    assert [m.scale for m in methods(["--scales", "2,5"], "dreambooth") if m.mode == "cfg"] == [2.0, 3.0, 5.0]
    every = methods(["--methods", "all"], "lora")
    assert every[:3] == paper and {m.caption for m in every} == {"true", "recovered", "empty"}
    assert sum(1 for m in every if m.rescale_cfg) == 2


def test_saturation_is_the_share_of_pixel_values_at_the_range_limits():
    images = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.3, 0.7, 0.99]).reshape(2, 1, 2, 2)  # 4 of 8 at or past a limit
    assert proving_ground.saturation(images) == 0.5
    assert proving_ground.saturation(torch.full((1, 3, 4, 4), 0.5)) == 0.0


def test_fine_tunes_record_their_memorisation_and_captions_are_read_back_from_the_weights(runs):
    report, _ = runs[0]
    for style, block in report["concepts"][0]["styles"].items():
        record, settings = block["fine_tune"]["record"], block["fine_tune"]["settings"]
        assert record["steps_run"] <= 50 and settings["target_memorisation"] == 0.4
        assert record["steps_run"] == 50 or record["memorisation"] >= 0.4  # stopped early only at the target
        recovery = block["caption_recovery"]
        assert tokenize(recovery["caption"]).shape[0] == 8 and len(recovery["caption"].split()) == 3
        assert recovery["keyword"] == "sks" and 1 <= recovery["keyword_rank"] <= len(WORD_IDS)
        assert recovery["keyword_in_caption"] == ("sks" in recovery["caption"].split())
        assert recovery["captions"][0][1] <= recovery["exhaustive_best"][1] + 1e-6  # nothing beats the true maximum
    summary = report["fine_tunes_and_caption_recovery"]
    assert set(summary) == set(STYLES)
    assert summary["lora"]["recovered_captions"] == [report["concepts"][0]["styles"]["lora"]["caption_recovery"]["caption"]]


def test_the_same_seeds_give_the_same_figures_and_a_second_seed_is_a_second_run(runs):
    (first, _), (again, _) = runs
    assert [c["seed"] for c in first["concepts"]] == [0] and [c["seed"] for c in again["concepts"]] == [0, 1]
    strip = lambda concept: json.dumps(  # noqa: E731
        {style: {name: {k: v for k, v in m.items() if k != "seconds"} for name, m in block["methods"].items()}
         for style, block in concept["styles"].items()}, sort_keys=True)
    assert strip(first["concepts"][0]) == strip(again["concepts"][0])
    assert strip(again["concepts"][1]) != strip(again["concepts"][0])
    for style in STYLES:  # seed 0's fine-tunes were reused, seed 1 trained its own
        files = [c["styles"][style]["fine_tune"]["file"] for c in (first["concepts"][0], *again["concepts"])]
        assert files[0] == files[1] != files[2]
    # Every summary figure is the mean over the concept-seed pairs.
    direct = [c["styles"]["dreambooth"]["methods"]["direct"]["AS"] for c in again["concepts"]]
    assert again["summary"]["dreambooth"]["direct"]["AS"] == {"mean": round(float(np.mean(direct)), 4),
                                                               "std": round(float(np.std(direct)), 4)}


@pytest.mark.parametrize("text", ["0,0", "one", "0;1"])
def test_seeds_that_are_not_distinct_integers_are_refused(text):
    with pytest.raises(SystemExit):
        proving_ground.parse_args(["--seeds", text])


@pytest.mark.parametrize("text", ["lora,lora", ","])
def test_styles_that_are_not_distinct_names_are_refused(text):
    with pytest.raises(SystemExit):
        proving_ground.parse_args(["--styles", text])


def test_an_unknown_style_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        proving_ground.parse_args(["--styles", "lora,loha"])
    assert "unknown fine-tune style loha: use dreambooth, lora, locon" in capsys.readouterr().err


def test_a_relative_world_folder_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert proving_ground.parse_args(["--world", "cache/world/x"]).world == str(tmp_path / "cache" / "world" / "x")
    assert proving_ground.parse_args([]).world is None


def run_command(*args: str) -> subprocess.CompletedProcess:
    """``python -m lab.proving_ground`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lab.proving_ground", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_command_refuses_too_few_images_before_it_builds_a_world(tmp_path):
    save_noise_images(tmp_path / "images", 1)
    done = run_command("--images", str(tmp_path / "images"), "--world", str(tmp_path / "world"),
                       "--out", str(tmp_path / "out"))
    assert done.returncode != 0
    assert "1 concepts x 5 images need 5 images, the folder has 1" in done.stderr
    assert not (tmp_path / "world").exists() and not (tmp_path / "out").exists()


def test_the_command_loads_the_host_first_and_names_a_world_of_another_format(tmp_path):
    # Reading the fine-tune styles while parsing arguments must not import the pack's core before the host loads.
    save_noise_images(tmp_path / "images", N0)
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / store.SPEC_FILE).write_text(json.dumps({"spec": {"format_version": 3}}))
    done = run_command("--images", str(tmp_path / "images"), "--n0", str(N0), "--styles", "dreambooth,lora",
                       "--world", str(tmp_path / "world"), "--out", str(tmp_path / "out"))
    assert done.returncode != 0
    assert "imported as a top-level package" not in done.stderr
    assert f"--world {tmp_path / 'world'}: world format 3 is not {store.FORMAT_VERSION}: rebuild the world" in done.stderr
