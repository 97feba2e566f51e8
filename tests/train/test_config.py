"""Training config: YAML, overrides, clear errors."""

from __future__ import annotations

import pytest

from lorafleet.errors import InvalidRequest
from lorafleet.train.config import load_config


def test_yaml_values_then_flag_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("base: /m\ntrain: t.jsonl\nout: o\nrank: 8\nlr: 0.001\n")
    config = load_config(path, rank=4, lr=None)
    assert (config.rank, config.lr, config.epochs) == (4, 0.001, 3)


def test_unknown_or_bad_fields_are_named(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("base: /m\ntrain: t.jsonl\nout: o\nlearning_rate: 0.1\n")
    with pytest.raises(InvalidRequest, match="learning_rate"):
        load_config(path)
    with pytest.raises(InvalidRequest, match="dropout"):
        load_config(None, base="/m", train="t", out="o", dropout=1.5)


def test_rank_above_the_servers_max_is_refused():
    with pytest.raises(InvalidRequest, match="max LoRA rank 64"):
        load_config(None, base="/m", train="t", out="o", rank=128)
