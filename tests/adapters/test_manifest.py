"""The trainer's manifest.json beside an uploaded adapter, unit level: read within bounds or
refused naming "manifest", compared with the version's digest, summed up in a few lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.adapters.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_DEPTH,
    manifest_matches,
    manifest_summary,
    read_manifest,
)
from lorafleet.errors import InvalidAdapter

DIGEST = "ab" * 32


def trainer_manifest(digest: str = DIGEST) -> dict:
    """A manifest shaped as `lorafleet.train.pipeline.finish` writes it (the parts the summary
    reads)."""
    return {
        "adapter_digest": digest,
        "base": {"base": "./tiny", "architecture": "Qwen2_5_VLForConditionalGeneration"},
        "versions": {"torch": "2.13.0"},
        "data_sha256": {"train": "c" * 64},
        "hyperparameters": {"rank": 8, "lr": 0.0002},
        "training": {
            "steps": 120,
            "best_val_loss": 0.6125,
            "stopped_early": False,
            "converged": True,
            "val_losses": [0.9, 0.6125],
            "advice": None,
        },
        "evaluation": {
            "sets": [
                {
                    "name": "validation",
                    "metric": "exact_match",
                    "n": 40,
                    "base": 0.1,
                    "adapter": 0.9,
                },
                {"name": "probe", "metric": "exact_match", "n": 20, "base": 0.95, "adapter": 0.85},
            ],
            "verdicts": [
                "Forgetting: the probe score fell from 0.950 to 0.850 (10.0 points, tolerance 5)."
            ],
        },
        "servability": {
            "digest": digest,
            "prompts": 8,
            "changed": 8,
            "agreed_tokens": 8,
            "near_ties": 1,
        },
    }


def _folder(tmp_path: Path, content: bytes | None) -> Path:
    if content is not None:
        (tmp_path / MANIFEST_FILE).write_bytes(content)
    return tmp_path


def _refusal(tmp_path: Path, content: bytes, phrase: str) -> None:
    with pytest.raises(InvalidAdapter) as info:
        read_manifest(_folder(tmp_path, content))
    assert info.value.field == "manifest" and info.value.status == 400
    assert phrase in info.value.message


def test_a_folder_without_a_manifest_has_none(tmp_path):
    assert read_manifest(_folder(tmp_path, None)) is None


def test_the_trainers_manifest_reads_back_as_written(tmp_path):
    manifest = trainer_manifest()
    assert read_manifest(_folder(tmp_path, json.dumps(manifest, indent=2).encode())) == manifest


def test_a_manifest_of_exactly_the_limit_is_kept(tmp_path):
    padding = MAX_MANIFEST_BYTES - len(json.dumps({"pad": ""}))
    content = json.dumps({"pad": "x" * padding}).encode()
    assert len(content) == MAX_MANIFEST_BYTES
    assert read_manifest(_folder(tmp_path, content)) == {"pad": "x" * padding}


def test_a_manifest_over_the_limit_is_refused(tmp_path):
    content = json.dumps({"pad": "x" * MAX_MANIFEST_BYTES}).encode()
    _refusal(
        tmp_path, content, f"{len(content)} bytes, over the limit of {MAX_MANIFEST_BYTES} bytes"
    )


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'"a string"', "must be a JSON object, not str"),
        (b"null", "must be a JSON object, not NoneType"),
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"a": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
        (
            b"[" * 100_000 + b"]" * 100_000,
            "not valid JSON",
        ),  # nested past the parser's recursion limit
    ],
    ids=["list", "string", "null", "broken", "empty", "not-utf8", "too-deep-to-parse"],
)
def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path, content, phrase):
    _refusal(tmp_path, content, phrase)


def test_a_manifest_nested_deeper_than_the_limit_is_refused(tmp_path):
    deep: dict = {}  # one level
    for _ in range(MAX_MANIFEST_DEPTH - 1):
        deep = {"a": deep}
    assert read_manifest(_folder(tmp_path, json.dumps(deep).encode())) == deep  # at the limit
    _refusal(tmp_path, json.dumps({"a": [deep]}).encode(), f"deeper than {MAX_MANIFEST_DEPTH}")


def test_a_manifest_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / MANIFEST_FILE).mkdir()
    with pytest.raises(InvalidAdapter, match="is a folder"):
        read_manifest(tmp_path)


def test_non_finite_numbers_python_writes_are_kept_as_null(tmp_path):
    """Python's json writes a diverged loss as NaN; JSON (and PostgreSQL's json) has no such
    number."""
    content = (
        b'{"training": {"best_val_loss": NaN, "val_losses": [Infinity, -Infinity, 1e999, 0.5]}}'
    )
    assert read_manifest(_folder(tmp_path, content)) == {
        "training": {"best_val_loss": None, "val_losses": [None, None, None, 0.5]}
    }


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (trainer_manifest(DIGEST), True),
        ({"adapter_digest": f"sha256:{DIGEST.upper()}"}, True),
        (trainer_manifest("cd" * 32), False),
        # the servability check's, when the top-level one is missing
        ({"servability": {"digest": DIGEST}}, True),
        ({"training": {"steps": 3}}, None),  # records no digest: nothing to compare
        ({"adapter_digest": 42}, None),
        ({"adapter_digest": ""}, None),
        (None, None),
    ],
    ids=[
        "trainer",
        "prefixed-uppercase",
        "other-weights",
        "servability",
        "none-recorded",
        "not-a-string",
        "empty",
        "no-manifest",
    ],
)
def test_manifest_matches_compares_the_recorded_digest_with_the_versions(manifest, expected):
    assert manifest_matches(manifest, DIGEST) is expected


def test_the_summary_gives_the_key_numbers_of_the_trainers_manifest():
    assert manifest_summary(trainer_manifest()) == [
        "base ./tiny (Qwen2_5_VLForConditionalGeneration)",
        "trained 120 steps, best validation loss 0.613, converged",
        "validation exact_match: base 0.100 -> adapter 0.900 (n=40), +0.800",
        "probe exact_match: base 0.950 -> adapter 0.850 (n=20), -0.100",
        "Forgetting: the probe score fell from 0.950 to 0.850 (10.0 points, tolerance 5).",
        "servable: changes 8/8 check outputs, vLLM = PEFT on the first 8 tokens (1 near ties)",
    ]


def test_the_summary_of_a_manifest_of_another_shape_says_what_it_holds():
    assert manifest_summary({"notes": "by hand", "author": "me"}) == [
        "no training numbers (keys: author, notes)"
    ]
    assert manifest_summary({"training": {"steps": "many"}, "evaluation": {"sets": "?"}}) == [
        "trained ? steps"
    ]
