"""Every option is declared once: each face shows it where it belongs, with the same default, help and validation."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from hf_offload import OffloadConfig, OffloadTrainingArguments
from hf_offload.commands import cli
from hf_offload.integrations.plugin import LayerStreamingPlugin
from hf_offload.options import all_options, base_type, reference_markdown, spelled, trainer_flag

DOCS = Path(__file__).resolve().parents[1] / "docs" / "options.md"
ALL = all_options()
# A value each option refuses, and one it takes (other than its default).
BAD = {
    "device": "gpu-please",
    "prefetch": -1,
    "offload_activations": "yes",
    "pin_memory": "yes",
    "preserve_rng_state": 2,
    "show_progress": "yes",
    "base_weight_dtype": "fp3",
    "check_host_memory": "yes",
    "expert_fetch": "some",
    "eval_group_size": 0,
    "chunked_loss": "yes",
    "loss_chunk_tokens": -1,
    "mlp_tile_tokens": -5,
    "full_finetune": "yes",
    "store_cache": " ",
    "early_layer_steps": "yes",
    "host_optimizer_bits": 16,
    "lora_r": 0,
    "lora_alpha": -2.0,
    "lora_dropout": 1.5,
    "lora_target_modules": " , ",
    "default_optim": "adamw_quantum",
    "save_merged": "yes",
    "load_into_store": "maybe",
    "skip_bad_steps": "yes",
    "spike_sigmas": -1.0,
    "spike_window": 1,
    "spike_min_steps": 1,
    "max_consecutive_skips": 0,
    "shared_host_store": "yes",
    "partitioned_fetch": "yes",
}


def _command_parser(command: str) -> argparse.ArgumentParser:
    subparsers = cli.build_parser()._subparsers._group_actions[0]
    return subparsers.choices[command]


def _actions(command: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in _command_parser(command)._actions if a.help != argparse.SUPPRESS}


def test_every_declared_option_has_a_refused_value_in_this_test():
    assert {opt.name for opt in ALL} == set(BAD)  # a new option must be added here, so it is checked on every face


@pytest.mark.parametrize("opt", ALL, ids=lambda o: o.name)
def test_each_face_shows_the_option_with_the_same_default_and_help(opt):
    plugin_fields = {f.name: f for f in dataclasses.fields(LayerStreamingPlugin)}
    trainer_fields = {f.name: f for f in dataclasses.fields(OffloadTrainingArguments)}
    config_fields = {f.name: f for f in dataclasses.fields(OffloadConfig)}
    shown = {
        "config": opt.name in config_fields,
        "plugin": opt.name in plugin_fields,
        "trainer": trainer_flag(opt.name) in trainer_fields,
        **{command: opt.name in _actions(command) for command in ("launch", "plan", "bench")},
    }
    assert {face for face, here in shown.items() if here} == set(opt.faces)
    if opt.on("plugin"):
        assert plugin_fields[opt.name].default == opt.default
    if opt.on("trainer"):
        field = trainer_fields[trainer_flag(opt.name)]
        assert (field.default, field.metadata["help"]) == (opt.default, opt.help)
    for command in ("launch", "plan", "bench"):
        if opt.on(command):
            action = _actions(command)[opt.name]
            assert action.default == opt.default
            assert action.help.replace("%%", "%").startswith(opt.help)


@pytest.mark.parametrize("opt", ALL, ids=lambda o: o.name)
def test_each_face_refuses_a_bad_value_with_the_same_rule_naming_the_option_as_that_face_spells_it(opt, capsys):
    bad = BAD[opt.name]
    messages = {}
    for face, build in (
        ("config", lambda: OffloadConfig(**{opt.name: bad})),
        ("plugin", lambda: LayerStreamingPlugin(**{opt.name: bad})),
        ("trainer", lambda: OffloadTrainingArguments(output_dir="unused", **{trainer_flag(opt.name): bad})),
    ):
        if opt.on(face):
            with pytest.raises(ValueError) as err:
                build()
            messages[face] = str(err.value)
    # argparse itself refuses what cannot be typed (a word for a flag, a value outside the choices)
    if opt.on("launch") and base_type(opt.type) in (int, float, str) and not opt.choices:
        code = cli.main(["launch", f"--{opt.name}", str(bad), "--", "python"])
        assert code == 2
        messages["launch"] = capsys.readouterr().err.removeprefix("hf-offload launch: ").strip()
    rules = {face: message.split(" should be ", 1) for face, message in messages.items()}
    for face, (name, _) in rules.items():
        assert name.endswith(spelled(opt.name, face)), (face, name)
    assert len({rule for _, rule in rules.values()}) == 1, messages


def test_the_options_reference_in_the_docs_is_current():
    expected = reference_markdown()
    assert DOCS.read_text() == expected, (
        "docs/options.md is stale: run `python -m hf_offload.options > docs/options.md`"
    )
