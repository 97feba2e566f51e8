"""The trainer's `manifest.json`, uploaded beside an adapter: read within bounds, kept on its
version, checked against the version's digest, and summed up in a few lines (what `lorafleet
adapters show` prints).

It is informational. The content digest covers the tensors and `adapter_config.json` only, so the
same adapter with another manifest (or none) is the same version, and the version keeps the manifest
of its first upload. What the trainer writes (`lorafleet.train.pipeline.finish`): `adapter_digest`,
`base`, `versions`, `data_sha256`, `hyperparameters`, `training`, `evaluation` (base vs adapter per
set, with verdicts) and `servability`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorafleet.errors import InvalidAdapter

__all__ = [
    "MANIFEST_FILE",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_DEPTH",
    "read_manifest",
    "recorded_digest",
    "manifest_matches",
    "manifest_summary",
]

MANIFEST_FILE = "manifest.json"
# the trainer writes a few KB: hyper-parameters, losses, scores, checks
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 64  # nested objects and arrays; the trainer's go 4 deep
_FIELD = "manifest"  # what InvalidAdapter names


def _finite_or_none(value: float) -> float | None:
    # Python's json (the trainer's) writes a diverged loss as NaN or Infinity, which JSON has not
    # and PostgreSQL's json type refuses; 1e999 reads as infinity too. Informational numbers: kept
    # as null, not refused.
    return value if math.isfinite(value) else None


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (0: a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's `manifest.json` as a JSON object (None: there is none);
    InvalidAdapter("manifest", ...) when it is over MAX_MANIFEST_BYTES, not JSON, nested deeper
    than MAX_MANIFEST_DEPTH, or not an object."""
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    if not path.is_file():
        raise InvalidAdapter(_FIELD, f"{MANIFEST_FILE} is a folder; it must be a JSON file")
    if (size := path.stat().st_size) > MAX_MANIFEST_BYTES:
        raise InvalidAdapter(
            _FIELD,
            f"{MANIFEST_FILE} is {size} bytes, over the limit of {MAX_MANIFEST_BYTES} "
            "bytes (1 MiB)",
        )
    try:
        manifest = json.loads(
            path.read_bytes(),
            parse_constant=lambda _: None,
            parse_float=lambda text: _finite_or_none(float(text)),
        )
    except (ValueError, RecursionError) as exc:  # ValueError includes bytes that are not UTF-8
        raise InvalidAdapter(
            _FIELD, f"{MANIFEST_FILE} is not valid JSON: {str(exc)[:200]}"
        ) from exc
    if not isinstance(manifest, dict):
        raise InvalidAdapter(
            _FIELD, f"{MANIFEST_FILE} must be a JSON object, not {type(manifest).__name__}"
        )
    if _depth(manifest) > MAX_MANIFEST_DEPTH:
        raise InvalidAdapter(
            _FIELD, f"{MANIFEST_FILE} nests deeper than {MAX_MANIFEST_DEPTH} levels"
        )
    return manifest


def recorded_digest(manifest: dict[str, Any]) -> str | None:
    """The adapter digest the manifest records (the trainer's `adapter_digest`, else its
    servability check's), as bare lowercase hex; None when it records none."""
    servability = manifest.get("servability")
    for value in (
        manifest.get("adapter_digest"),
        servability.get("digest") if isinstance(servability, dict) else None,
    ):
        if isinstance(value, str) and value:
            return value.strip().lower().removeprefix("sha256:")
    return None


def manifest_matches(manifest: dict[str, Any] | None, digest: str) -> bool | None:
    """Whether the digest the manifest records is the version's own (None: no manifest, or it
    records none). The trainer computes it with the server's validation, so a mismatch means the
    manifest came from other weights."""
    recorded = recorded_digest(manifest) if manifest is not None else None
    return None if recorded is None else recorded == digest


def _get(data: Any, *path: str) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> str:
    if not _is_number(value):
        return "?"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _training_line(training: dict[str, Any]) -> str:
    parts = [f"trained {_number(training.get('steps'))} steps"]
    if "best_val_loss" in training:
        parts.append(f"best validation loss {_number(training['best_val_loss'])}")
    if isinstance(training.get("converged"), bool):
        parts.append("converged" if training["converged"] else "not converged")
    if training.get("stopped_early") is True:
        parts.append("stopped early")
    return ", ".join(parts)


def _set_line(scores: dict[str, Any]) -> str:
    base: Any = scores.get("base")
    adapter: Any = scores.get("adapter")
    line = (
        f"{scores.get('name', '?')} {scores.get('metric', '?')}: base {_number(base)} -> adapter "
        f"{_number(adapter)} (n={_number(scores.get('n'))})"
    )
    if _is_number(base) and _is_number(adapter):
        line += f", {adapter - base:+.3f}"
    return line


def _servability_line(servability: dict[str, Any]) -> str:
    return (
        f"servable: changes {_number(servability.get('changed'))}/"
        f"{_number(servability.get('prompts'))} check "
        f"outputs, vLLM = PEFT on the first {_number(servability.get('agreed_tokens'))} tokens "
        f"({_number(servability.get('near_ties'))} near ties)"
    )


def manifest_summary(manifest: dict[str, Any]) -> list[str]:
    """A few lines of the manifest's key numbers: base, training, each evaluated set (base vs
    adapter, with the verdicts: no help, forgetting) and the servability checks. Whatever the
    manifest lacks is left out."""
    lines = []
    if isinstance(base := _get(manifest, "base", "base"), str):
        architecture = _get(manifest, "base", "architecture")
        lines.append(
            f"base {base}" + (f" ({architecture})" if isinstance(architecture, str) else "")
        )
    if isinstance(training := manifest.get("training"), dict):
        lines.append(_training_line(training))
    sets = _get(manifest, "evaluation", "sets")
    lines += [_set_line(s) for s in sets if isinstance(s, dict)] if isinstance(sets, list) else []
    verdicts = _get(manifest, "evaluation", "verdicts")
    lines += [v for v in verdicts if isinstance(v, str)] if isinstance(verdicts, list) else []
    if isinstance(servability := manifest.get("servability"), dict):
        lines.append(_servability_line(servability))
    return lines or [f"no training numbers (keys: {', '.join(sorted(manifest)[:8]) or 'none'})"]
