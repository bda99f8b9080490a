"""The run config: ModelConfig is the one definition of the model (its keys' bounds, the resume check),
and init_from means the same from the command line or a config file."""
from dataclasses import fields

import pytest
import torch
import yaml

from config import default_config, merge_config, resolve_config
from models import DECODERS, ModelConfig
from utils import InputError


def test_every_model_key_is_a_config_key_with_its_bounds():
    defaults = default_config()
    for f in fields(ModelConfig):
        assert f.name in defaults, f.name
    ModelConfig.of(defaults)  # the defaults make a model
    with pytest.raises(InputError, match="emb_dim must be >= 1"):
        merge_config(defaults, {"emb_dim": 0}, "test")
    with pytest.raises(InputError, match="encoder_stages must be one of 1, 2, 3, 4"):
        merge_config(defaults, {"encoder_stages": "5"}, "test")
    with pytest.raises(InputError, match=f"decoder must be one of {', '.join(DECODERS)}"):
        merge_config(defaults, {"decoder": "lstm"}, "test")
    assert ModelConfig() == ModelConfig.of(defaults)  # each field's default is default.yaml's
    with pytest.raises(InputError, match="test: length_pool must be >= 0, got -1"):  # a training key's bound
        merge_config(defaults, {"length_pool": "-1"}, "test")
    for key in ("attend_after_word", "attention_gate", "attention_cell_positions"):  # attention-maps.md's options
        assert merge_config(defaults, {key: "yes"}, "test")[key] is True
        with pytest.raises(InputError, match=f"^test: {key} must be true or false") as refused:
            merge_config(defaults, {key: "maybe"}, "test")
        assert "\n" not in str(refused.value)


def test_model_differences_name_the_key():
    a = ModelConfig.of(default_config())
    b = ModelConfig.of(dict(default_config(), decoder_dim=256))
    assert a.differences(b) == [("decoder_dim", 512, 256)] and a.differences(a) == []
    assert ModelConfig.of_checkpoint({"model": a.__dict__, "config": {}}) == a
    assert ModelConfig.of_checkpoint({"config": default_config()}) == a  # written before checkpoints held `model`


def checkpoint(path, **settings):
    """A file with what resolve_config reads of a checkpoint: its config."""
    torch.save({"config": dict(default_config(), **settings)}, path)
    return path


def test_init_from_means_the_same_on_the_command_line_and_in_a_config_file(tmp_path):
    """The new run starts from the checkpoint's settings, then the config file, then --key value."""
    init = checkpoint(tmp_path / "xe.pt", decoder="rnn", emb_dim=64, data_name="mine", decoder_lr=1e-3)
    (tmp_path / "scst.yaml").write_text(yaml.safe_dump({"init_from": str(init), "objective": "scst"}))
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"objective": "scst"}))
    from_file, _, init_a, _ = resolve_config(["--config", str(tmp_path / "scst.yaml"), "--scst_samples", "3"])
    from_cli, _, init_b, _ = resolve_config(["--config", str(tmp_path / "plain.yaml"), "--init_from", str(init),
                                             "--scst_samples", "3"])
    assert from_file == from_cli
    assert init_a["config"] == init_b["config"]
    assert (from_file["decoder"], from_file["emb_dim"], from_file["data_name"]) == ("rnn", 64, "mine")
    assert from_file["objective"] == "scst" and from_file["scst_samples"] == 3
    assert from_file["out"] == "runs/rnn"  # the checkpoint's run folder is not the new run's
    other = checkpoint(tmp_path / "other.pt", decoder="attention")
    cfg, _, init_c, _ = resolve_config(["--config", str(tmp_path / "scst.yaml"), "--init_from", str(other)])
    assert cfg["decoder"] == "attention" and init_c["config"]["decoder"] == "attention"  # the command line wins


def test_a_mistyped_key_gets_the_nearest_one():
    with pytest.raises(InputError, match=r"unknown config key 'decoder_lrr'; did you mean 'decoder_lr'\?"):
        merge_config(default_config(), {"decoder_lrr": 1e-3}, "--decoder_lrr")
    with pytest.raises(InputError, match=r"unknown config key 'zzz' \(configs/default.yaml lists them\)"):
        merge_config(default_config(), {"zzz": 1}, "x.yaml")
