"""RunSettings: the JSON the sampling nodes output reads back to the same settings, other dicts are refused, and the
part a candidate bank's key takes has the key's own field names (those of bank.json before the settings were typed)."""
import json

import pytest

from finextract_core.run_settings import RunSettings

SETTINGS = RunSettings(mode="finextract", guidance_scale=3.0, k=-0.02, seed=7, steps=50, sampler="ddim",
                       scheduler="ddim_uniform", denoise=1.0, latent_shape=(4, 64, 64), candidates=500,
                       first_candidate=0, noise="per-candidate-noise-v2",
                       model_family="SD15 (BaseModel, latent SD15)", fine_tune="separate checkpoints",
                       pack_version="0.1.0")


def test_json_round_trip_and_layout():
    values = json.loads(SETTINGS.to_json())
    assert values["latent_shape"] == [4, 64, 64] and values["sampler"] == "ddim" and len(values) == 15
    assert RunSettings.from_dict(values) == SETTINGS
    assert list(json.loads(SETTINGS.to_json())) == sorted(values), "sorted keys: the same settings, the same text"


def test_other_dicts_are_refused_naming_the_fields():
    values = SETTINGS.to_dict()
    del values["noise"]
    with pytest.raises(ValueError, match=r"without \['noise'\].*connect the run settings"):
        RunSettings.from_dict(values)
    with pytest.raises(ValueError, match=r"unknown \['cfg'\]"):
        RunSettings.from_dict({**SETTINGS.to_dict(), "cfg": 7})


def test_candidate_key_has_the_bank_keys_names():
    assert SETTINGS.candidate_key() == {
        "scheme": "per-candidate-noise-v2", "mode": "finextract", "guidance_scale": 3.0, "k": -0.02, "seed": 7,
        "steps": 50, "sampler": "ddim", "scheduler": "ddim_uniform", "latent_shape": [4, 64, 64]}
