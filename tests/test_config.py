import pytest

from bids_roimae.config import AppConfig, ConfigError, load_config


def test_defaults_follow_the_design():
    cfg = load_config()
    assert (cfg.geometry.patch_size, cfg.geometry.window, cfg.geometry.temporal_patch) == (6, 20, 4)
    assert cfg.masking.ratio == 0.5 and cfg.masking.strategy == "roi"


def test_toml_then_cli_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\npreset = "small"\n[train]\nsteps = 50\nbatch_size = 4\n')
    cfg = load_config(f, {"train": {"steps": 7, "batch_size": None}})
    assert cfg.model.preset == "small"
    assert cfg.train.steps == 7 and cfg.train.batch_size == 4


@pytest.mark.parametrize("text, word", [
    ("[train]\nstepz = 3\n", "stepz"),
    ("[nonsense]\na = 1\n", "nonsense"),
    ("[geometry]\nwindow = 10\ntemporal_patch = 4\n", "multiple"),
    ("[masking]\nratio = 1.5\n", "ratio"),
    ("[train\n", "TOML"),
])
def test_bad_config_is_named(tmp_path, text, word):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=word):
        load_config(f)


def test_round_trip_dict():
    cfg = load_config(overrides={"masking": {"strategy": "random"}, "seed": 3})
    again = AppConfig.from_dict(cfg.to_dict())
    assert again == cfg
