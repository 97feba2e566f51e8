"""Upload validation, unit level: each bad adapter raises one typed error naming the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.adapters.base_model import load_base_spec
from lorafleet.adapters.errors import InvalidAdapter, PayloadTooLarge
from lorafleet.adapters.validate import validate_adapter_dir, validate_upload
from tests.conftest import MAX_RANK, MAX_UPLOAD
from tests.factories import REJECTIONS, bad_archive, copy_adapter, edit_tensors, rename_module, tar_gz, zip_dir


def _validate(archive: Path, tiny_model: Path, work: Path):
    return validate_upload(archive, work / "unpacked", load_base_spec(str(tiny_model)), max_rank=MAX_RANK,
                           max_bytes=MAX_UPLOAD)


def test_valid_adapter_reports_rank_targets_and_digest(make_adapter, tiny_model, tmp_path):
    validated = _validate(tar_gz(make_adapter(1), tmp_path / "a.tar.gz"), tiny_model, tmp_path)
    assert validated.rank == 8 and validated.alpha == 16
    assert validated.target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    assert len(validated.digest) == 64


def test_zip_and_tar_of_the_same_adapter_have_one_digest(make_adapter, tiny_model, tmp_path):
    a = _validate(tar_gz(make_adapter(1), tmp_path / "a.tar.gz"), tiny_model, tmp_path / "t")
    b = _validate(zip_dir(make_adapter(1), tmp_path / "a.zip"), tiny_model, tmp_path / "z")
    assert a.digest == b.digest


def test_different_weights_have_different_digests(make_adapter, tiny_model, tmp_path):
    spec = load_base_spec(str(tiny_model))
    assert (validate_adapter_dir(make_adapter(1), spec, MAX_RANK).digest
            != validate_adapter_dir(make_adapter(2), spec, MAX_RANK).digest)


def test_transformers4_key_names_map_to_the_language_model(make_adapter, tiny_model, tmp_path):
    folder = edit_tensors(copy_adapter(make_adapter(1), tmp_path / "legacy"),
                          rename_module("model.language_model.", "model."))
    validated = validate_adapter_dir(folder, load_base_spec(str(tiny_model)), MAX_RANK)
    assert "q_proj" in validated.target_modules


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_bad_upload_is_refused_with_its_reason(case, make_adapter, vision_adapter, tiny_model, tmp_path):
    status, phrase = REJECTIONS[case]
    archive = bad_archive(case, make_adapter(1), tmp_path, vision_adapter, make_adapter(3, rank=32))
    expected = PayloadTooLarge if status == 413 else InvalidAdapter
    with pytest.raises(expected) as info:
        _validate(archive, tiny_model, tmp_path)
    assert phrase in info.value.message
