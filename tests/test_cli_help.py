"""Every ``dclgan`` subcommand documents every option, and ``dclgan train`` takes its defaults from the
config dataclasses (training/config.py) and shows them."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from importlib import import_module

import pytest

from training.cli import COMMANDS
from training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from training.train_cli import build_parser, config_from_args, field_default

CONFIGS = (TrainConfig, ModelConfig, OptimConfig, DataConfig)
# Options that are not a config field: what they mean is said in their help.
CLI_ONLY = {"resume"}
# val_size's default depends on --eval-every, so argparse holds None and config_from_args resolves it.
RESOLVED_LATER = {"val_size"}


class Captured(Exception):
    """Raised instead of parsing: carries the parser a subcommand built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(command: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser ``dclgan COMMAND`` builds, caught at its first ``parse_args`` call."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Captured(self)

    module, func, _ = COMMANDS[command]
    entry = getattr(import_module(module), func)
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(Captured) as caught:
            entry(["--help"])
    return caught.value.parser


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = parser_of(command, monkeypatch)
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in options(parser) if not a.help]
    assert not missing, f"dclgan {command}: options without help text: {missing}"


def config_field(dest: str) -> type | None:
    # Nested configs (TrainConfig.model, .optim, .data) are the only fields built by a default_factory.
    owners = [cls for cls in CONFIGS if dest in {f.name for f in fields(cls) if f.default_factory is MISSING}]
    assert len(owners) <= 1, f"{dest} is a field of several configs: {owners}"
    return owners[0] if owners else None


def test_train_defaults_come_from_the_config_dataclasses() -> None:
    parser = build_parser()
    for action in options(parser):
        if action.required or action.dest in CLI_ONLY | RESOLVED_LATER:
            continue
        owner = config_field(action.dest)
        assert owner is not None, f"{action.option_strings[0]} sets {action.dest}, which no config has"
        assert action.default == field_default(owner, action.dest), action.option_strings[0]


def test_train_defaults_build_the_default_config() -> None:
    """Parsing nothing but the dataroot gives exactly the dataclasses' defaults (val_size resolved included)."""
    cfg = config_from_args(build_parser().parse_args(["--dataroot", "d"]))
    assert cfg == TrainConfig(data=DataConfig(dataroot="d"))


def test_train_help_shows_every_default() -> None:
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in options(parser):
        if not action.required:
            assert "%(default)" in formatter._get_help_string(action), action.option_strings[0]
    text = parser.format_help()
    assert "(default: 0.0002)" in text and "(default: hinge)" in text


def test_cli_only_options_are_not_config_fields() -> None:
    for dest in CLI_ONLY:
        assert config_field(dest) is None
