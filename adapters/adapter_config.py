"""Read an adapter's `adapter_config.json` and check every field that PEFT or the engine reads.

Each check raises `InvalidAdapter(field, reason)`. Three fields are regexes that other code runs
with Python's `re`: PEFT fullmatches a string `target_modules` against the model's module names, and
vLLM matches every `rank_pattern` / `alpha_pattern` key against each module it loads. `re` cannot be
stopped once it backtracks (and the `regex` package finishes in microseconds patterns that hang
`re`), so the patterns run here in a short-lived child process with a CPU-time limit, on the very
names they will meet.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lorafleet.adapters.base_model import BaseModelSpec
from lorafleet.errors import InvalidAdapter

__all__ = [
    "CONFIG_FILE",
    "MAX_CONFIG_BYTES",
    "MAX_PATTERN_CHARS",
    "REGEX_CPU_S",
    "read_config",
    "check_target_modules",
    "configured_ranks",
]

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # PEFT writes about 1 KB
MAX_PATTERN_CHARS = 1000  # one regex in target_modules, rank_pattern or alpha_pattern
# CPU time one field's regexes may take on every name they meet (fine ones take microseconds)
REGEX_CPU_S = 1.0
# backstop only: CPU time, not a busy machine's wall clock, decides a regex is too slow
_CHILD_WALL_S = 30.0
# init_lora_weights strings that only set the starting weights (vLLM's PEFTHelper refuses every
# other string)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# PEFT features vLLM does not implement (PEFTHelper._validate_features): config key -> what it is
_UNSERVED_FEATURES = {
    "use_dora": "DoRA adapters",
    "lora_bias": "LoRA bias",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "use_qalora": "QALoRA",
}
# SIGPROF's default action ends the process: the only way to stop `re` in the middle of a match
_MATCHER = (
    "import json, re, signal, sys\n"
    "jobs = json.load(sys.stdin)\n"
    "signal.setitimer(signal.ITIMER_PROF, float(sys.argv[1]))\n"
    "hits = [[getattr(re, how)(p, n) is not None for n in names] for p, names, how in jobs]\n"
    "signal.setitimer(signal.ITIMER_PROF, 0)\n"
    "json.dump(hits, sys.stdout)"
)


def _load(path: Path) -> dict:
    if path.is_dir():
        raise InvalidAdapter(CONFIG_FILE, "is a folder; it must be a JSON file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(CONFIG_FILE, f"is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise InvalidAdapter(CONFIG_FILE, f"not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(CONFIG_FILE, "must be a JSON object")
    return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a rank


def _is_positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _check_flag(config: dict, field: str) -> None:
    if config.get(field) is not None and not isinstance(config[field], bool):
        raise InvalidAdapter(field, f"must be true or false, got {config[field]!r}")


def _check_features(config: dict) -> None:
    if not isinstance(config.get("peft_type"), str) or config["peft_type"].upper() != "LORA":
        raise InvalidAdapter(
            "peft_type", f"only LORA adapters are served, got {config.get('peft_type')!r}"
        )
    for field in ("use_dora", "use_rslora", "lora_bias", "use_qalora"):
        _check_flag(config, field)
    for field, feature in _UNSERVED_FEATURES.items():
        if config.get(field):
            raise InvalidAdapter(field, f"{feature} cannot be hot-loaded by the engine")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(
            "bias", f"bias must be 'none' (trained biases are not served), got {config['bias']!r}"
        )
    saved = config.get("modules_to_save")
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(m, str) for m in saved)
    ):
        raise InvalidAdapter(
            "modules_to_save", f"must be null or a list of module names, got {saved!r}"
        )
    if saved:
        raise InvalidAdapter(
            "modules_to_save",
            f"full copies of {saved} cannot be hot-loaded; train LoRA layers only",
        )
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool | str) or (
        isinstance(init, str) and init.lower() not in _PLAIN_INITS
    ):
        raise InvalidAdapter(
            "init_lora_weights",
            f"{init!r} changes the base weights when loaded (PiSSA, OLoRA, "
            "LoftQ...); convert it to a plain LoRA adapter",
        )


def _check_pattern_keys(config: dict, field: str) -> dict:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise InvalidAdapter(
            field, f"must be an object of module pattern -> value, got {type(patterns).__name__}"
        )
    for key in patterns:
        if not key or len(key) > MAX_PATTERN_CHARS:
            raise InvalidAdapter(
                field, f"pattern {key[:40]!r} must have 1 to {MAX_PATTERN_CHARS} characters"
            )
    return patterns


def _check_ranks(config: dict, max_rank: int) -> None:
    if not _is_int(config.get("r")) or config["r"] <= 0:
        raise InvalidAdapter("r", f"rank must be a positive integer, got {config.get('r')!r}")
    for key, rank in _check_pattern_keys(config, "rank_pattern").items():
        if not _is_int(rank) or rank <= 0:
            raise InvalidAdapter(
                "rank_pattern", f"rank for {key!r} must be a positive integer, got {rank!r}"
            )
    top = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    if top > max_rank:
        raise InvalidAdapter("r", f"rank {top} is above this server's max LoRA rank {max_rank}")


def _check_alphas(config: dict) -> None:
    if not _is_positive_number(config.get("lora_alpha")):  # alpha 0 scales every update to nothing
        raise InvalidAdapter(
            "lora_alpha", f"must be a finite number above 0, got {config.get('lora_alpha')!r}"
        )
    for key, alpha in _check_pattern_keys(config, "alpha_pattern").items():
        if not _is_positive_number(alpha):
            raise InvalidAdapter(
                "alpha_pattern", f"alpha for {key!r} must be a finite number above 0, got {alpha!r}"
            )


def _check_target_type(config: dict) -> None:
    targets = config.get("target_modules")
    if isinstance(targets, str) and 0 < len(targets) <= MAX_PATTERN_CHARS:
        return
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        return
    raise InvalidAdapter(
        "target_modules",
        f"must be a regex of 1 to {MAX_PATTERN_CHARS} characters or a non-empty "
        f"list of module names, got {str(targets)[:80]!r}",
    )


def read_config(folder: Path, max_rank: int) -> dict:
    """The adapter's config, every field PEFT or the engine reads checked for type and range."""
    config = _load(folder / CONFIG_FILE)
    _check_features(config)
    _check_ranks(config, max_rank)
    _check_alphas(config)
    _check_target_type(config)
    return config


def _run_patterns(field: str, jobs: list[tuple[str, Sequence[str], str]]) -> list[list[bool]]:
    """`re.<how>(pattern, name)` for each job's names, in a child process stopped after
    REGEX_CPU_S of CPU."""
    for pattern, _, _ in jobs:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise InvalidAdapter(field, f"invalid regex {pattern!r}: {exc}") from exc
    too_slow = InvalidAdapter(
        field,
        f"a regex takes more than {REGEX_CPU_S}s on the model's module names "
        "(nested quantifiers such as (a+)+ backtrack without end); simplify it",
    )
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _MATCHER, str(REGEX_CPU_S)],
            input=json.dumps(jobs),
            capture_output=True,
            text=True,
            timeout=_CHILD_WALL_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise too_slow from exc
    if done.returncode == -signal.SIGPROF:
        raise too_slow
    if done.returncode != 0:
        raise InvalidAdapter(field, f"a regex could not be matched: {done.stderr.strip()[-200:]}")
    return json.loads(done.stdout)


def check_target_modules(config: dict, spec: BaseModelSpec) -> None:
    """A regex must hit a LoRA-able layer (of the language model, or of the vision tower and
    connector where vLLM applies LoRA to them); a list may only name modules the base has."""
    targets = config["target_modules"]
    lora_able = [*spec.lora_modules, *spec.tower_modules]
    paths = [*lora_able, *spec.other_linear]
    if isinstance(targets, str):  # PEFT: re.fullmatch(target_modules, module name)
        (hits,) = _run_patterns("target_modules", [(targets, paths, "fullmatch")])
        if not any(hits[: len(lora_able)]):
            others = zip(paths[len(lora_able) :], hits[len(lora_able) :])
            elsewhere = sorted({spec.other_linear[p] for p, hit in others if hit})
            if not elsewhere:
                raise InvalidAdapter(
                    "target_modules", f"{targets!r} matches no layer the engine applies LoRA to"
                )
            raise InvalidAdapter(
                "target_modules",
                f"{targets!r} matches only layers of the {' and '.join(elsewhere)}, where the "
                f"engine applies no LoRA for the base {spec.name} "
                f"({spec.architecture or 'unknown architecture'}): it would silently ignore them",
            )
        return
    for name in targets:
        if not any(p == name or p.endswith("." + name) for p in paths):
            raise InvalidAdapter("target_modules", f"the base model has no module {name!r}")


def _first_match(config: dict, field: str, modules: Sequence[str]) -> list[str | None]:
    """Per module, the first `field` key that vLLM's `_match_pattern` picks for it (None: no key
    matches)."""
    keys = list(config.get(field) or {})
    if not keys:
        return [None] * len(modules)
    hits = _run_patterns(field, [(rf"(.*\.)?({key})$", modules, "match") for key in keys])
    return [
        next((key for key, row in zip(keys, hits) if row[i]), None) for i in range(len(modules))
    ]


def configured_ranks(config: dict, modules: Sequence[str]) -> dict[str, tuple[int, str]]:
    """Per module (checkpoint name without `base_model.model.`), the rank the engine expects and
    the field that sets it ("rank_pattern" or "r")."""
    # vLLM runs these keys too: time them before it does
    _first_match(config, "alpha_pattern", modules)
    keys = _first_match(config, "rank_pattern", modules)
    return {
        m: (config["rank_pattern"][k], "rank_pattern") if k is not None else (config["r"], "r")
        for m, k in zip(modules, keys)
    }
