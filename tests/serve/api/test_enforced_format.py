"""A deployment's enforced answer format, through the real gateway and engine (vLLM's structured
outputs), with the unmodified `openai` SDK."""

from __future__ import annotations

from tests.helpers import upload_folder

LETTERS = ["A", "B", "C", "D"]


def test_an_enforced_choice_yields_only_allowed_answers_and_a_clients_own_constraint_wins(
    new_tenant, make_adapter, general_requests
):
    tenant = new_tenant()
    with tenant.http() as http:
        upload_folder(http, "ext", make_adapter(1))
        http.put("/v1/deployments/quiz", json={"adapter": "ext"}).raise_for_status()
    client = tenant.openai()
    prompts = general_requests[:8]

    def answers(**extra) -> list[str]:
        return [
            client.chat.completions.create(
                model="quiz", messages=m, max_tokens=8, temperature=0, **extra
            )
            .choices[0]
            .message.content
            for m in prompts
        ]

    free = answers()
    assert not set(free) <= set(LETTERS)  # the adapter does not answer with a letter of itself
    with tenant.http() as http:
        declared = http.put(
            "/v1/deployments/quiz/answer-format", json={"choice": LETTERS, "enforce": True}
        )
        assert declared.status_code == 200, declared.text
    assert declared.json()["answer_format"] == {"choice": LETTERS, "enforce": True}
    enforced = answers()
    assert set(enforced) <= set(LETTERS)
    own = answers(extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert set(own) <= {"yes", "no"}
    with tenant.http() as http:  # declared, no longer enforced: answers as before
        http.put("/v1/deployments/quiz/answer-format", json={"choice": LETTERS}).raise_for_status()
    assert answers() == free
