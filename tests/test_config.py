from pathlib import Path

import pytest

from sparkml_dist.config import JobConfig, load_config
from sparkml_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("digits*.yaml")))
def test_shipped_training_configs_load(path):
    cfg = load_config(path)
    assert cfg.training.num_workers == 2 and cfg.data.features_col == "features"


def test_unknown_key_names_the_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key training\.epoch; valid keys under training "
                                          r"are: num_workers, batch_size, epochs"):
        load_config(p)


def test_unknown_section_and_wrong_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer: {}\n")
    with pytest.raises(ConfigError, match="unknown key trainer; valid keys are: data, model"):
        load_config(p)
    p.write_text("training:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"training\.epochs: expected an integer; got 'three'"):
        load_config(p)
    p.write_text("backend:\n  name: mpi\n")
    with pytest.raises(ConfigError, match=r"backend\.name: 'mpi' is not one of 'torch', 'horovod'"):
        load_config(p)


def test_set_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "conf/digits.yaml",
                      ["training.epochs=3", "model.kwargs={hidden: [8]}", "fault.inject={rank: 1, step: 5}"])
    assert cfg.training.epochs == 3
    assert dict(cfg.model.kwargs) == {"hidden": [8]}
    assert cfg.fault.inject is not None and (cfg.fault.inject.rank, cfg.fault.inject.step) == (1, 5)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["training.epochs"])


def test_validation_messages():
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        JobConfig().replace(**{"data.val_fraction": 1.5})
    with pytest.raises(ConfigError, match="model.factory must look like"):
        JobConfig().replace(**{"model.factory": "nocolon"})
    with pytest.raises(ConfigError, match="regression"):
        JobConfig().replace(**{"data.task": "regression"})


def test_flat_params_cover_every_field():
    flat = JobConfig().flat()
    assert flat["training.epochs"] == "5" and flat["backend.name"] == "torch"
    assert flat["strategy.kind"] == "data_parallel" and flat["strategy.compression.name"] == "none"
    assert "fault.inject" in flat and "tracking.tracking_uri" in flat
