"""Example configs parse through the real CLI parser; bad keys and values are named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from var_lab.config import FitConfig, FitTokenizerConfig, from_dict
from var_lab.train import parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_parse(path):
    cls = FitTokenizerConfig if path.name.startswith("tokenizer") else FitConfig
    cfg = parse_config(cls, ["--config", str(path)], "test", "test")
    assert isinstance(cfg, cls)
    if cls is FitConfig:
        assert cfg.model.depth >= 1
        override = parse_config(cls, ["--config", str(path), "--model.depth", "3"], "test", "test")
        assert override.model.depth == 3 and override.data.name == cfg.data.name


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depht: 3\n")
    with pytest.raises(SystemExit):
        parse_config(FitConfig, ["--config", str(bad)], "test", "test")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'model.depht'; allowed keys here: .*depth"):
        from_dict(FitConfig, {"model": {"depht": 3}}, str(bad))


def test_wrong_type_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: sixteen\n")
    with pytest.raises(SystemExit):
        parse_config(FitConfig, ["--config", str(bad)], "test", "test")
    assert "depth" in capsys.readouterr().err
