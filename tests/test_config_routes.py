"""One config path: for every field of the run configs, an invalid value gives the same one-line message whether it
comes from a ``--config`` file, a ``--a.b`` override or a sweep file (which adds the file and the line)."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import yaml

from var_lab.cli import main as cli_main
from var_lab.config import ConfigError, FitConfig, FitTokenizerConfig, config_keys, from_dict
from var_lab.sweeps.schema import OWNED_KEYS, SweepError, load_sweep, nest

#: values that fail a field's value check (the type-invalid value of each field is derived from its annotation)
OUT_OF_RANGE = {
    "model.depth": 0,
    "model.num_classes": 0,
    "model.mlp_ratio": 0.0,
    "model.drop_path_rate": 1.5,
    "model.cond_drop_rate": -0.1,
    "tokenizer.vocab_size": 1,
    "tokenizer.ch_mult": [],
    "tokenizer.patch_nums": [1, 3, 2],
    "data.batch_size": 0,
    "data.resolution": 4,
    "optim.base_lr": 0.0,
    "optim.betas": [0.9, 1.5],
    "optim.final_lr_ratio": 2.0,
    "trainer.max_steps": 0,
    "trainer.devices": "bogus",
    "trainer.accumulate_grad_batches": 0,
    "eval.top_p": 1.5,
    "lr": -1.0,
    "loss.disc_start_step": -1,
}


def type_invalid(annotation: typing.Any) -> typing.Any:
    """A value of the wrong type for an annotation (an empty string where any string would do)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Union and len(args) == 1:
        return type_invalid(args[0])
    if origin is typing.Literal or (
        origin is typing.Union and any(typing.get_origin(a) is typing.Literal for a in args)
    ):
        return "bogus" if origin is typing.Literal or str not in args else ""
    if origin is typing.Union:  # devices: int, list or str
        return "bogus"
    if origin is list:  # trainer.callbacks / trainer.logger: a list of {class_path, init_args}
        return "bogus"
    if origin is tuple:
        return ["a"] if args[-1] is Ellipsis else [0.9]
    return {bool: "maybe", int: "abc", float: "abc", str: ""}[annotation]


def cases() -> list:
    out = []
    for cls in (FitConfig, FitTokenizerConfig):
        for key, annotation in config_keys(cls).items():
            out.append(pytest.param(cls, key, type_invalid(annotation), id=f"{cls.__name__}:{key}:type"))
            if key in OUT_OF_RANGE and key.split(".")[0] in {f for f in cls.__dataclass_fields__}:
                out.append(pytest.param(cls, key, OUT_OF_RANGE[key], id=f"{cls.__name__}:{key}:value"))
    return out


def cli_text(value: typing.Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def cli_error(capsys, cls: type, argv: list[str]) -> str:
    """stderr of the real command (a type error exits while parsing, a value error is reported by var_lab.cli)."""
    command = "fit" if cls is FitConfig else "fit-tokenizer"
    try:
        code = cli_main([command, *argv])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


@pytest.mark.parametrize("cls, key, value", cases())
def test_an_invalid_value_gives_one_message_by_every_route(tmp_path: Path, capsys, cls, key, value):
    with pytest.raises(ConfigError) as info:
        from_dict(cls, nest({key: value}))
    message = info.value.message
    assert message.startswith(f"{key}=") and " is invalid: " in message

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(nest({key: value})))
    command = "var-lab fit" if cls is FitConfig else "var-lab fit-tokenizer"
    assert f"{command}: error: {message}" in cli_error(capsys, cls, ["--config", str(config)])
    assert f"{command}: error: {message}" in cli_error(capsys, cls, [f"--{key}", cli_text(value)])

    if key in OWNED_KEYS:
        return  # the sweep sets these itself (its own message says what to set instead)
    kind = "var" if cls is FitConfig else "tokenizer"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nkind: {kind}\nbase:\n  {key}: {json.dumps(value)}\n")
    with pytest.raises(SweepError) as sweep_info:
        load_sweep(sweep)
    assert str(sweep_info.value) == f"{sweep}:4: base.{key}: {message}"


def test_every_field_has_a_case():
    keys = {(c.values[0], c.values[1]) for c in cases()}
    assert len(keys) == len(config_keys(FitConfig)) + len(config_keys(FitTokenizerConfig))
