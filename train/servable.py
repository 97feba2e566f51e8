"""Prove a saved adapter servable before calling it done (an adapter whose keys miss vLLM's
modules loads without error and serves the base's answers).

(a) every tensor maps to a layer vLLM applies LoRA to: the server's own upload validation;
(b) in vLLM, its greedy outputs differ from the base's on the check prompts (for an adapter on the
    vision tower or connector, which only pictures reach: on the prompts with a picture);
(c) vLLM's greedy tokens equal PEFT's for the first N tokens (where PEFT itself is not at a
    near-tie).
Any failure raises NotServable: an error, not a warning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorafleet.adapters.base_model import load_base_spec, training_dtype
from lorafleet.adapters.pictures import PictureBudget, default_pictures, scale_pictures
from lorafleet.adapters.validate import validate_adapter_dir
from lorafleet.chat_jsonl import count_images
from lorafleet.errors import NotServable

__all__ = ["Servability", "prove_servable", "peft_greedy", "NEAR_TIE_LOGITS"]

NEAR_TIE_LOGITS = 0.05  # a top-2 logit gap below this is a tie either engine may break either way


@dataclass(frozen=True)
class Servability:
    digest: str
    parts: tuple[str, ...]  # the parts of the base the adapter changes
    prompts: int
    changed: int  # prompts whose vLLM output differs from the base (with a picture: see above)
    agreed_tokens: int  # first tokens compared between vLLM and PEFT, per prompt
    near_ties: int  # prompts where the engines parted at a near-tie

    def to_dict(self) -> dict:
        """As JSON writes it (the manifest's `servability`)."""
        return asdict(self) | {"parts": list(self.parts)}


def peft_greedy(
    base: str,
    adapter: Path,
    prompts: list[list[dict]],
    max_tokens: int,
    pictures: PictureBudget | None = None,
) -> list[tuple[list[int], list]]:
    """Greedy token ids and per-step logits from transformers + PEFT, the reference
    implementation; pictures scaled down to `pictures` (default: as a default server does)."""
    import copy

    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = getattr(torch, training_dtype(base, torch.cuda.is_available()))
    processor = AutoProcessor.from_pretrained(base)
    scale_pictures(processor, pictures or default_pictures(base))
    base_model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
    model: Any = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    results = []
    for messages in prompts:
        inputs = processor.apply_chat_template(
            copy.deepcopy(messages),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        results.append((ids, [logits[0].float().cpu() for logits in out.logits]))
    return results


def _agree(vllm_ids: list[int], peft_ids: list[int], logits: list, n: int) -> tuple[bool, bool]:
    """(agree, parted at a near-tie) over the first n tokens."""
    for k in range(min(n, len(vllm_ids), len(peft_ids))):
        if vllm_ids[k] != peft_ids[k]:
            top2 = logits[k].topk(2).values
            return bool(top2[0] - top2[1] < NEAR_TIE_LOGITS), True
    return min(len(vllm_ids), n) == min(len(peft_ids), n), False


def prove_servable(
    base: str,
    adapter: Path,
    prompts: list[list[dict]],
    vllm_outputs: dict[str, list[dict]],
    n_tokens: int,
    max_rank: int,
    pictures: PictureBudget | None = None,
) -> Servability:
    """Raise NotServable unless (a), (b) and (c) hold; `vllm_outputs` has "base" and "adapter"
    generations."""
    validated = validate_adapter_dir(Path(adapter), load_base_spec(base), max_rank)  # (a)
    base_ids = [o["token_ids"] for o in vllm_outputs["base"]]
    adapter_ids = [o["token_ids"] for o in vllm_outputs["adapter"]]
    # (b) the prompts whose answers the adapter can change
    seen = list(range(len(prompts)))
    if validated.parts != ("language",):
        seen = [i for i in seen if count_images(prompts[i])]
        if not seen:
            raise NotServable(
                f"the adapter changes the {' and '.join(validated.parts)}, which only pictures "
                "reach, and none of the check prompts has one: add pictures to the validation set"
            )
    changed = sum(adapter_ids[i] != base_ids[i] for i in seen)
    if changed == 0:
        raise NotServable(
            f"the adapter changes none of {len(seen)} greedy outputs in vLLM: it would be "
            "served as a silent no-op (untrained, or its weights do not reach the engine's layers)"
        )
    near_ties = 0
    for i, (ids, logits) in enumerate(
        peft_greedy(base, adapter, prompts, n_tokens, pictures)
    ):  # (c)
        agree, parted = _agree(adapter_ids[i], ids, logits, n_tokens)
        if not agree:
            raise NotServable(
                f"vLLM and PEFT disagree on check prompt {i}: vLLM {adapter_ids[i][:n_tokens]} vs "
                f"PEFT {ids[:n_tokens]}; the engine does not apply the adapter as trained"
            )
        near_ties += parted
    return Servability(
        digest=validated.digest,
        parts=validated.parts,
        prompts=len(prompts),
        changed=changed,
        agreed_tokens=n_tokens,
        near_ties=near_ties,
    )
