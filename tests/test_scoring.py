"""Task metrics and format compliance."""

from __future__ import annotations

import pytest

from lorafleet.scoring import anls, exact_match, json_fields
from lorafleet.train.compare import infer_answer_format


def test_exact_match_ignores_case_and_spacing():
    assert exact_match("  A Red  circle ", "a red circle") == 1.0
    assert exact_match("a red square", "a red circle") == 0.0


def test_anls_is_partial_credit_with_a_threshold():
    assert anls("invoice 1234", "invoice 1234") == 1.0
    assert 0.8 < anls("invoice 1235", "invoice 1234") < 1.0
    assert anls("something else entirely", "invoice 1234") == 0.0


def test_json_fields_scores_each_field_and_zero_for_invalid_json():
    reference = '{"shape": "circle", "color": "red"}'
    assert json_fields('{"color": "red", "shape": "circle"}', reference) == 1.0
    assert json_fields('{"shape": "square", "color": "red"}', reference) == 0.5
    assert json_fields("a red circle", reference) == 0.0
    with pytest.raises(ValueError):
        json_fields("{}", "not json")


def test_format_is_inferred_from_the_references():
    name, check = infer_answer_format(['{"a": 1}', '{"a": 2}'])
    assert name == "valid JSON object" and check('{"b": 3}') and not check("b: 3")
    name, check = infer_answer_format(["rouge", "bleu"])
    assert name == "one word" and check("vert") and not check("a green square")
    assert infer_answer_format(["a red circle", "a blue square"]) is None
