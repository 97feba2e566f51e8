"""Upload validation, unit level: each bad adapter raises one typed error naming the reason."""

from __future__ import annotations

import io
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from lorafleet.adapters.archive import MAX_MEMBERS
from lorafleet.adapters.base_model import load_base_spec
from lorafleet.adapters.validate import extract_archive, validate_adapter_dir, validate_upload
from lorafleet.errors import InvalidAdapter, PayloadTooLarge
from tests.conftest import MAX_RANK, MAX_UPLOAD, NEAR_BASE_STD
from tests.factories import (
    CONFIG,
    GIB,
    HOSTILE,
    REJECTIONS,
    bad_archive,
    copy_adapter,
    edit_config,
    edit_tensors,
    gzip_bomb,
    hostile_archive,
    rename_module,
    tar_gz,
    zero_lora,
    zip_dir,
)


def _validate(archive: Path, tiny_model: Path, work: Path):
    return validate_upload(
        archive,
        work / "unpacked",
        load_base_spec(str(tiny_model)),
        max_rank=MAX_RANK,
        max_bytes=MAX_UPLOAD,
    )


def test_valid_adapter_reports_rank_targets_and_digest(make_adapter, tiny_model, tmp_path):
    validated = _validate(tar_gz(make_adapter(1), tmp_path / "a.tar.gz"), tiny_model, tmp_path)
    assert validated.rank == 8 and validated.alpha == 16
    assert validated.target_modules == (
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    )
    assert len(validated.digest) == 64


def test_zip_and_tar_of_the_same_adapter_have_one_digest(make_adapter, tiny_model, tmp_path):
    a = _validate(tar_gz(make_adapter(1), tmp_path / "a.tar.gz"), tiny_model, tmp_path / "t")
    b = _validate(zip_dir(make_adapter(1), tmp_path / "a.zip"), tiny_model, tmp_path / "z")
    assert a.digest == b.digest


def test_different_weights_have_different_digests(make_adapter, tiny_model, tmp_path):
    spec = load_base_spec(str(tiny_model))
    assert (
        validate_adapter_dir(make_adapter(1), spec, MAX_RANK).digest
        != validate_adapter_dir(make_adapter(2), spec, MAX_RANK).digest
    )


def test_transformers4_key_names_map_to_the_language_model(make_adapter, tiny_model, tmp_path):
    folder = edit_tensors(
        copy_adapter(make_adapter(1), tmp_path / "legacy"),
        rename_module("model.language_model.", "model."),
    )
    validated = validate_adapter_dir(folder, load_base_spec(str(tiny_model)), MAX_RANK)
    assert "q_proj" in validated.target_modules


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_bad_upload_is_refused_with_its_reason(case, make_adapter, tiny_model, tmp_path):
    status, phrase = REJECTIONS[case]
    archive = bad_archive(case, make_adapter(1), tmp_path, make_adapter(3, rank=32))
    expected = PayloadTooLarge if status == 413 else InvalidAdapter
    with pytest.raises(expected) as info:
        _validate(archive, tiny_model, tmp_path)
    assert phrase in info.value.message


def _refusal(info: pytest.ExceptionInfo, status: int, field: str | None, phrase: str) -> None:
    assert info.value.status == status
    assert getattr(info.value, "field", None) == field
    assert phrase in info.value.message


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_upload_is_refused_fast_with_its_field(case, make_adapter, tiny_model, tmp_path):
    status, field, phrase = HOSTILE[case]
    archive = hostile_archive(case, make_adapter(1), tmp_path)
    t0 = time.monotonic()
    with pytest.raises((InvalidAdapter, PayloadTooLarge)) as info:
        _validate(archive, tiny_model, tmp_path)
    # archive checks; a slow regex gets REGEX_CPU_S of CPU time
    if field == "file" or status == 413:
        assert time.monotonic() - t0 < 2
    _refusal(info, status, field, phrase)


def test_ten_gib_gzip_bomb_is_refused_in_well_under_a_second_without_unpacking(tmp_path):
    archive = gzip_bomb(tmp_path / "bomb.tar.gz", 10 * GIB, 20 << 20)
    assert archive.stat().st_size < 100_000
    t0 = time.monotonic()
    with pytest.raises(PayloadTooLarge):
        extract_archive(archive, tmp_path / "out", MAX_UPLOAD)
    assert time.monotonic() - t0 < 0.5
    # refused at the header: nothing written
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_gzip_bomb_without_a_declared_size_stops_while_streaming(tmp_path):
    # a PAX header whose record tarfile reads whole: only counting the decompressed stream stops it
    archive = gzip_bomb(tmp_path / "bomb.tar.gz", 10 * GIB, 64 << 20, kind=tarfile.XHDTYPE)
    t0 = time.monotonic()
    with pytest.raises((InvalidAdapter, PayloadTooLarge)):
        extract_archive(archive, tmp_path / "out", MAX_UPLOAD)
    assert time.monotonic() - t0 < 0.5  # 64 MiB of zeros are never all decompressed


def test_a_few_more_files_and_folders_within_the_limits_are_accepted(
    make_adapter, tiny_model, tmp_path
):
    def extras(tar: tarfile.TarFile) -> None:
        tar.add(tmp_path, arcname="adapter/docs", recursive=False)  # a folder entry
        for i in range(MAX_MEMBERS - 4):
            info = tarfile.TarInfo(f"adapter/docs/{i}.md")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))

    validated = _validate(
        tar_gz(make_adapter(1), tmp_path / "a.tar.gz", extras), tiny_model, tmp_path
    )
    assert validated.rank == 8


def test_zip_with_a_million_entry_directory_is_refused_from_its_end_record(tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("adapter/adapter_config.json", "{}")
    data = bytearray(archive.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8 : end + 12] = (60_000).to_bytes(2, "little") * 2  # entries on this disk / in total
    archive.write_bytes(bytes(data))
    with pytest.raises(InvalidAdapter) as info:
        extract_archive(archive, tmp_path / "out", MAX_UPLOAD)
    _refusal(info, 400, "file", f"more than {MAX_MEMBERS} files")


NAN, INF = float("nan"), float("inf")
CONFIG_FIELDS = [  # (changes to adapter_config.json, the field refused, a phrase of the reason)
    ({"peft_type": 5}, "peft_type", "only LORA"),
    ({"target_modules": 5}, "target_modules", "must be a regex"),
    ({"target_modules": ["q_proj", 3]}, "target_modules", "list of module names"),
    ({"target_modules": []}, "target_modules", "non-empty list"),
    ({"target_modules": "(q_proj"}, "target_modules", "invalid regex"),
    ({"target_modules": r"(.*)*x"}, "target_modules", "takes more than"),
    ({"target_modules": "x" * 1001}, "target_modules", "1 to 1000 characters"),
    ({"r": 0}, "r", "positive integer"),
    ({"r": -8}, "r", "positive integer"),
    ({"r": True}, "r", "positive integer"),
    ({"r": 8.0}, "r", "positive integer"),
    ({"r": "8"}, "r", "positive integer"),
    ({"r": 4}, "r", "tensors have rank 8, but adapter_config.json gives it rank 4"),
    ({"lora_alpha": "16"}, "lora_alpha", "finite number above 0"),
    ({"lora_alpha": NAN}, "lora_alpha", "finite number above 0"),
    ({"lora_alpha": INF}, "lora_alpha", "finite number above 0"),
    ({"lora_alpha": 0}, "lora_alpha", "finite number above 0"),
    ({"lora_alpha": -16}, "lora_alpha", "finite number above 0"),
    ({"lora_alpha": None}, "lora_alpha", "finite number above 0"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern", "must be an object"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern", "positive integer"),
    ({"rank_pattern": {"q_proj": "8"}}, "rank_pattern", "positive integer"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern", "gives it rank 4"),
    ({"rank_pattern": {"(q": 8}}, "rank_pattern", "invalid regex"),
    ({"rank_pattern": {r"((\w|\.)+)+Z": 8}}, "rank_pattern", "takes more than"),
    ({"rank_pattern": {"q_proj": 64}}, "r", "above this server's max LoRA rank"),
    ({"alpha_pattern": "q_proj"}, "alpha_pattern", "must be an object"),
    ({"alpha_pattern": {"q_proj": NAN}}, "alpha_pattern", "finite number above 0"),
    ({"alpha_pattern": {"q_proj": 0}}, "alpha_pattern", "finite number above 0"),
    ({"alpha_pattern": {r"(\w+\.?)+z": 16}}, "alpha_pattern", "takes more than"),
    ({"use_dora": "false"}, "use_dora", "true or false"),
    ({"use_rslora": 1}, "use_rslora", "true or false"),
    ({"lora_bias": True}, "lora_bias", "cannot be hot-loaded"),
    ({"layer_replication": [[0, 1]]}, "layer_replication", "cannot be hot-loaded"),
    ({"bias": 1}, "bias", "bias must be 'none'"),
    ({"modules_to_save": "lm_head"}, "modules_to_save", "null or a list"),
    ({"modules_to_save": [1]}, "modules_to_save", "null or a list"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights", "convert it to a plain LoRA"),
    ({"init_lora_weights": 1.5}, "init_lora_weights", "convert it to a plain LoRA"),
]


@pytest.mark.parametrize(
    ("changes", "field", "phrase"), CONFIG_FIELDS, ids=[f"{c}" for c, _, _ in CONFIG_FIELDS]
)
def test_bad_config_field_is_refused_naming_the_field(
    changes, field, phrase, make_adapter, tiny_model, tmp_path
):
    folder = edit_config(copy_adapter(make_adapter(1), tmp_path / "adapter"), **changes)
    with pytest.raises(InvalidAdapter) as info:
        validate_adapter_dir(folder, load_base_spec(str(tiny_model)), MAX_RANK)
    _refusal(info, 400, field, phrase)


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("[" * 100_000, "not valid JSON"),
        ("\xff\xfe", "not valid JSON"),
    ],
)
def test_config_that_is_not_a_json_object_is_refused(
    text, phrase, make_adapter, tiny_model, tmp_path
):
    folder = copy_adapter(make_adapter(1), tmp_path / "adapter")
    (folder / CONFIG).write_bytes(text.encode("latin-1"))
    with pytest.raises(InvalidAdapter) as info:
        validate_adapter_dir(folder, load_base_spec(str(tiny_model)), MAX_RANK)
    _refusal(info, 400, CONFIG, phrase)


def test_rank_pattern_that_matches_the_tensors_is_accepted(make_adapter, tiny_model, tmp_path):
    folder = edit_config(
        copy_adapter(make_adapter(1), tmp_path / "adapter"),
        r=4,
        rank_pattern={".*": 8},
        alpha_pattern={"q_proj": 4},
    )
    assert validate_adapter_dir(folder, load_base_spec(str(tiny_model)), MAX_RANK).rank == 8


def _first_of(kind: str, value: float) -> Callable[[dict], dict]:
    def edit(tensors: dict) -> dict:
        key = next(k for k in sorted(tensors) if kind in k)
        changed = tensors[key].clone()
        changed[0, 0] = value
        return {**tensors, key: changed}

    return edit


def _zero_alternately(tensors: dict) -> dict:
    """Every layer keeps one nonzero factor, but never both: each B @ A is still zero."""
    import torch

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    zeroed = {f"{m}.lora_{'AB'[i % 2]}.weight" for i, m in enumerate(modules)}
    return {k: torch.zeros_like(v) if k in zeroed else v for k, v in tensors.items()}


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (
            zero_lora("lora_B"),
            "all lora_B weights are zero: this adapter would serve the base model's output",
        ),
        (zero_lora("lora_A"), "all lora_A weights are zero"),
        (_zero_alternately, "every layer has an all-zero lora_A or lora_B"),
        (_first_of("lora_B", float("nan")), "NaN or infinite"),
        (_first_of("lora_A", float("-inf")), "NaN or infinite"),
    ],
    ids=["zero-B", "zero-A", "zero-product", "nan", "inf"],
)
def test_weights_that_cannot_change_the_output_or_are_not_finite_are_refused(
    edit, phrase, make_adapter, tiny_model, tmp_path
):
    folder = edit_tensors(copy_adapter(make_adapter(1), tmp_path / "adapter"), edit)
    with pytest.raises(InvalidAdapter) as info:
        validate_adapter_dir(folder, load_base_spec(str(tiny_model)), MAX_RANK)
    _refusal(info, 400, "weights", phrase)


def test_freshly_initialised_peft_adapter_is_refused(make_adapter, tiny_model):
    with pytest.raises(InvalidAdapter) as info:  # get_peft_model starts every lora_B at zero
        validate_adapter_dir(make_adapter(0, std=0.0), load_base_spec(str(tiny_model)), MAX_RANK)
    _refusal(info, 400, "weights", "all lora_B weights are zero")


def test_one_nonzero_layer_is_enough_to_be_served(make_adapter, tiny_model, tmp_path):
    def keep_one_b(tensors: dict) -> dict:
        import torch

        first = next(k for k in sorted(tensors) if "lora_B" in k)
        return {
            k: torch.zeros_like(v) if "lora_B" in k and k != first else v
            for k, v in tensors.items()
        }

    folder = edit_tensors(copy_adapter(make_adapter(1), tmp_path / "adapter"), keep_one_b)
    assert validate_adapter_dir(folder, load_base_spec(str(tiny_model)), MAX_RANK).rank == 8


def test_near_base_adapter_used_by_the_suite_is_served(make_adapter, tiny_model):
    assert validate_adapter_dir(
        make_adapter(0, std=NEAR_BASE_STD), load_base_spec(str(tiny_model)), MAX_RANK
    )


def _tower_adapter(tiny_model: Path, out: Path, parts: tuple[str, ...]) -> Path:
    from lorafleet.train.random_adapter import make_random_adapter

    return make_random_adapter(tiny_model, out, seed=5, parts=parts)


@pytest.mark.parametrize(
    "parts", [("vision",), ("connector",), ("connector", "vision"), ("language", "vision")]
)
def test_an_adapter_on_the_tower_or_connector_is_accepted_and_says_which_parts(
    parts, tiny_model, tmp_path
):
    folder = _tower_adapter(tiny_model, tmp_path / "a", parts)
    validated = validate_adapter_dir(folder, load_base_spec(str(tiny_model)), MAX_RANK)
    assert validated.parts == parts
    if parts == ("connector",):
        assert set(validated.target_modules) == {"0", "2"}  # merger.mlp.0 and .2


def test_the_common_name_list_touches_language_and_vision(vision_adapter, tiny_model):
    validated = validate_adapter_dir(vision_adapter, load_base_spec(str(tiny_model)), MAX_RANK)
    assert validated.parts == ("language", "vision")


def test_a_tower_adapter_is_refused_naming_the_setting_that_forbids_it(tiny_model, tmp_path):
    folder = _tower_adapter(tiny_model, tmp_path / "a", ("vision",))
    spec = load_base_spec(str(tiny_model))
    with pytest.raises(InvalidAdapter) as info:
        validate_adapter_dir(folder, spec, MAX_RANK, tower_lora=False)
    _refusal(info, 400, "target_modules", "LORAFLEET_TOWER_LORA=off")
    assert "vision tower" in info.value.message
    # the language model is unaffected by the setting
    language = _tower_adapter(tiny_model, tmp_path / "l", ("language",))
    assert validate_adapter_dir(language, spec, MAX_RANK, tower_lora=False).parts == ("language",)


def test_a_tower_adapter_for_a_base_without_tower_lora_is_refused_naming_the_base(
    tiny_model, tmp_path
):
    from dataclasses import replace

    folder = _tower_adapter(tiny_model, tmp_path / "a", ("connector",))
    spec = load_base_spec(str(tiny_model))
    # a base as `load_base_spec` describes one whose architecture vLLM has no tower LoRA for
    unsupported = replace(
        spec,
        architecture="Idefics2ForConditionalGeneration",
        tower_modules={},
        connector_prefixes=(),
        other_linear={**spec.other_linear, **dict.fromkeys(spec.tower_modules, "vision tower")},
    )
    with pytest.raises(InvalidAdapter) as info:
        validate_adapter_dir(folder, unsupported, MAX_RANK)
    _refusal(info, 400, "target_modules", "Idefics2ForConditionalGeneration")
    assert str(tiny_model) in info.value.message and "applies no LoRA" in info.value.message
    with pytest.raises(ValueError, match="language model only"):
        unsupported.lora_target_regex(("vision",))
