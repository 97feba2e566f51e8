"""Answer confidence as a detector of a broken canary, against the format check (tiny model, real
engine, real trained adapters).

The rollout benchmark's world (`bench_rollout.build_world`): a deployment that answers JSON about
pictures of shapes; stable = a JSON adapter, good canary = the same recipe retrained with another
seed, bad canary = a French one-word-colour adapter (it breaks the JSON format). Trained here with
the same recipe: a second good canary (another seed), an undertrained one (20 steps instead of ~76)
and a confidently wrong one (answers whose colours were swapped: valid JSON, wrong content). The
"subtle" canary answers 20 % of the prompts like the bad one.

1. Every version answers the same held-out prompts on vLLM's offline engine, asking for the chosen
   tokens' log-probabilities (`SamplingParams(logprobs=0)`), greedy as the rollout bench does and at
   temperature 1. Per answer: its confidence (the mean token log-probability,
   `serve/feedback/confidence.summarize`, as the gateway records it), whether it has the
   deployment's answer format (the rollout bench's JSON Schema) and whether it is correct (the
   reference's JSON object).
2. Sequential detection, resampled from those answers (seeded orderings, drawn with replacement):
   canary and stable each serve `--look-every` more requests between looks, and look k spends
   `look_alpha(alpha, k)` as a rollout does; each detector spends the whole alpha alone and needs
   `Limits().min_rollback_requests` per variant. A: the rollout's format-validity test
   (`proportion_harm`, margin `Limits().format_margin`). B: one-sided Mann-Whitney U, "the canary's
   confidence is lower by more than the tolerance". C: the same hypothesis on the means (one-sided
   Welch t). The tolerance is relative, like the latency test's: the canary's log-probabilities are
   divided by 1 + `--tolerance` (moved towards 0) before the test.

    .venv/bin/python loadtests/bench_confidence.py [--quick] [--prompts 300] [--orderings 200]
        [--budget 500] [--look-every 10] [--tolerance 0.25] [--temperatures 0,1] [--work DIR]
        [--check]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_rollout import JSON_FORMAT, build_world
from rich.console import Console
from rich.table import Table
from scipy import stats

from lorafleet.serve.answer_format import answer_checker
from lorafleet.serve.feedback.confidence import summarize
from lorafleet.serve.rollouts.statistics import Limits, Status, look_alpha, proportion_harm

console = Console(width=180)
MAX_TOKENS = 24  # the rollout bench's
UNDERTRAINED_STEPS = 20  # of the ~76 the full recipe takes (2 epochs of 600 examples, batch 16)
SUBTLE_SHARE = 0.2  # the rollout bench's subtle canary: this share of its answers are the bad one's
# the confidently wrong labels
SWAPPED = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "red"}
LIMITS = Limits()


@dataclass(frozen=True)
class Answer:
    """One served answer, as the benchmark scores it."""

    confidence: float  # mean token log-probability, nats per token
    valid: bool  # has the deployment's answer format
    correct: bool  # is the reference's JSON object


# --- the world: the rollout bench's adapters and two more canaries ---


def _swap_colours(source: Path, out: Path) -> Path:
    """The same examples (images shared by relative path), their answers' colours swapped."""
    with open(source) as f, open(out, "w") as w:
        for line in f:
            example = json.loads(line)
            answer = json.loads(example["messages"][-1]["content"])
            example["messages"][-1]["content"] = json.dumps(
                {**answer, "color": SWAPPED[answer["color"]]}
            )
            w.write(json.dumps(example) + "\n")
    return out


def train_canaries(work: Path, base: Path) -> dict[str, Path]:
    """A second good canary (another seed), an undertrained one and a confidently wrong one, with
    the rollout bench's recipe otherwise."""
    from lorafleet.train.config import load_config
    from lorafleet.train.trainer import train

    data = work / "data"
    swapped = (
        _swap_colours(data / "json-train.jsonl", data / "json-swapped-train.jsonl"),
        _swap_colours(data / "json-val.jsonl", data / "json-swapped-val.jsonl"),
    )
    json_task = (data / "json-train.jsonl", data / "json-val.jsonl")
    recipes = {
        "good-2": (*json_task, 0, 2),
        "undertrained": (*json_task, UNDERTRAINED_STEPS, 2),
        "confident-wrong": (*swapped, 0, 3),
    }
    adapters = {}
    for name, (train_file, val_file, max_steps, seed) in recipes.items():
        adapters[name] = out = work / f"adapter-{name}"
        if (out / "adapter_config.json").exists():
            continue  # --work of an earlier run
        config = load_config(
            None,
            base=str(base),
            train=train_file,
            val=val_file,
            mix=data / "general-train.jsonl",
            out=out,
            rank=16,
            lr=2e-3,
            epochs=2,
            batch_size=16,
            eval_every=25,
            seed=seed,
            max_steps=max_steps,
        )
        with console.status(f"training the {name} adapter"):
            train(config, progress=False)
    return adapters


def held_out(n: int, seed: int) -> tuple[list[list[dict]], list[dict]]:
    """JSON-task prompts about fresh pictures (as clients send them) and the objects they show."""
    from lorafleet.chat_jsonl import image_data_url
    from lorafleet.train.shapes import make_example

    rng = random.Random(seed)
    prompts, references = [], []
    for _ in range(n):
        image, question, reference = make_example("json", rng)
        prompts.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                        {"type": "text", "text": question},
                    ],
                }
            ]
        )
        references.append(json.loads(reference))
    return prompts, references


# --- part 1: answers and their confidence, from vLLM's offline engine ---


def generate(
    base: Path, adapters: dict[str, Path], prompts: list[list[dict]], temperatures: list[float]
) -> dict[str, dict[str, list[dict]]]:
    """{temperature: {version: [{"text", "logprobs"} per prompt]}}, from a child process (vLLM's
    offline engine spawns workers; `lorafleet.train.vllm_generate` is greedy and returns no
    log-probabilities)."""
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(
            json.dumps(
                {
                    "base": str(base.resolve()),
                    "prompts": prompts,
                    "temperatures": temperatures,
                    "adapters": {name: str(path.resolve()) for name, path in adapters.items()},
                }
            )
        )
        run = subprocess.run(
            [sys.executable, __file__, "--engine", str(request), str(result)],
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0 or not result.is_file():
            raise SystemExit(
                f"vLLM generation failed (exit {run.returncode}):\n{run.stderr[-3000:]}"
            )
        return json.loads(result.read_text())


def _engine(request_file: str, result_file: str) -> None:
    """The child: every adapter answers every prompt at every temperature, with the chosen
    tokens' logprobs."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from lorafleet.adapters.validate import engine_lora_rank

    request = json.loads(Path(request_file).read_text())
    cuda = torch.cuda.is_available()
    llm = LLM(
        model=request["base"],
        enable_lora=True,
        max_lora_rank=engine_lora_rank(16),
        max_loras=1,
        max_model_len=512,
        max_num_seqs=16,
        dtype="float32",
        enforce_eager=True,
        seed=0,
        gpu_memory_utilization=0.8 if cuda else 0.2,
    )
    results: dict[str, dict[str, list[dict]]] = {}
    for temperature in request["temperatures"]:
        # logprobs=0: only the chosen token's, of the model's distribution before temperature
        # (vLLM's default raw logprobs), as `"logprobs": true` gives the gateway
        params = SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, logprobs=0)
        results[str(temperature)] = by_version = {}
        for i, (name, path) in enumerate(request["adapters"].items(), start=1):
            outputs = llm.chat(
                request["prompts"], params, lora_request=LoRARequest(name, i, path), use_tqdm=False
            )
            by_version[name] = [
                {"text": o.outputs[0].text, "logprobs": _chosen(o.outputs[0])} for o in outputs
            ]
    Path(result_file).write_text(json.dumps(results))
    llm.llm_engine.engine_core.shutdown()  # otherwise exit waits forever on the engine-core process


def _chosen(output) -> list[float]:
    """The log-probability of each token the engine chose (EOS included, as the chat API returns
    it)."""
    return [
        float(step[token].logprob) for token, step in zip(output.token_ids, output.logprobs or [])
    ]


def score(generated: list[dict], references: list[dict]) -> list[Answer]:
    check = answer_checker(JSON_FORMAT)
    answers = []
    for item, reference in zip(generated, references):
        confidence = summarize(item["logprobs"])
        mean = confidence.mean if confidence else None
        try:
            correct = json.loads(item["text"]) == reference
        except ValueError:
            correct = False
        answers.append(Answer(mean if mean is not None else 0.0, check(item["text"]), correct))
    return answers


def _subtle(good: list[Answer], bad: list[Answer], seed: int) -> list[Answer]:
    rng = random.Random(seed)
    return [b if rng.random() < SUBTLE_SHARE else g for g, b in zip(good, bad)]


# --- part 2: sequential detection, resampled ---


@dataclass(frozen=True)
class Draw:
    """One ordering: what the canary and the stable served, in order (running invalid counts,
    confidences)."""

    invalid_c: np.ndarray
    invalid_s: np.ndarray
    confidence_c: np.ndarray
    confidence_s: np.ndarray


# (ordering, requests per variant so far, look's alpha) -> harm
Detector = Callable[[Draw, int, float], bool]


def format_harm(draw: Draw, n: int, alpha: float) -> bool:
    """A: the rollout's format-validity test (`proportion_harm`, its default margin)."""
    return (
        proportion_harm(
            "format_validity",
            int(draw.invalid_c[n - 1]),
            n,
            int(draw.invalid_s[n - 1]),
            n,
            LIMITS.format_margin,
            alpha,
            LIMITS,
            "FormatValidityRegressed",
        ).status
        is Status.FAILED
    )


def _tolerated(confidences: np.ndarray, tolerance: float) -> np.ndarray:
    """The canary's confidences moved towards 0 by a relative tolerance: a test of the moved
    values against the stable's shows the canary lower by more than the tolerance
    (log-probabilities are <= 0)."""
    return confidences / (1 + tolerance)


def confidence_rank_harm(tolerance: float) -> Detector:
    """B: one-sided Mann-Whitney U, H1 "the canary's confidence, tolerated, is stochastically
    lower"."""

    def harm(draw: Draw, n: int, alpha: float) -> bool:
        if n < LIMITS.min_rollback_requests:
            return False
        canary, stable = _tolerated(draw.confidence_c[:n], tolerance), draw.confidence_s[:n]
        return float(stats.mannwhitneyu(canary, stable, alternative="less").pvalue) < alpha

    return harm


def confidence_mean_harm(tolerance: float) -> Detector:
    """C: one-sided Welch t, H1 "the canary's mean confidence, tolerated, is lower" (a minority
    of very unsure answers moves a mean, not the ranks)."""

    def harm(draw: Draw, n: int, alpha: float) -> bool:
        if n < LIMITS.min_rollback_requests:
            return False
        canary, stable = _tolerated(draw.confidence_c[:n], tolerance), draw.confidence_s[:n]
        if np.ptp(canary) == 0 and np.ptp(stable) == 0:  # no variance: the means are exact
            return bool(canary[0] < stable[0])
        return (
            float(stats.ttest_ind(canary, stable, equal_var=False, alternative="less").pvalue)
            < alpha
        )

    return harm


def _draw(stable: list[Answer], canary: list[Answer], seed: int, n: int) -> Draw:
    """n requests per variant, answers drawn with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    s, c = ([answers[i] for i in rng.integers(0, len(answers), n)] for answers in (stable, canary))
    return Draw(
        np.cumsum([not a.valid for a in c]),
        np.cumsum([not a.valid for a in s]),
        np.array([a.confidence for a in c]),
        np.array([a.confidence for a in s]),
    )


def _first_detections(
    draw: Draw, detectors: dict[str, Detector], looks: range
) -> dict[str, int | None]:
    """Requests per variant at each detector's first failed look (None: not within the budget)."""
    found: dict[str, int | None] = dict.fromkeys(detectors)
    for look, n in enumerate(looks, start=1):
        alpha = look_alpha(LIMITS.alpha, look)  # each detector spends the whole alpha alone
        for name, harm in detectors.items():
            if found[name] is None and harm(draw, n, alpha):
                found[name] = n
        if all(v is not None for v in found.values()):
            break
    return found


def detect(
    stable: list[Answer],
    canary: list[Answer],
    detectors: dict[str, Detector],
    orderings: int,
    budget: int,
    every: int,
) -> dict[str, list[int | None]]:
    """Every detector on the same seeded orderings, a look every `every` requests per variant."""
    runs = [
        _first_detections(
            _draw(stable, canary, seed, budget), detectors, range(every, budget + 1, every)
        )
        for seed in range(orderings)
    ]
    return {name: [run[name] for run in runs] for name in detectors}


# --- report ---


def _rate(values: Sequence[float]) -> str:
    return f"{statistics.mean(values):.3f}" if values else "-"


def _quantiles(values: Sequence[float]) -> str:
    """median [p10, p90]"""
    if not values:
        return "-"
    p10, p50, p90 = np.quantile(values, [0.1, 0.5, 0.9])
    return f"{p50:.3f} [{p10:.3f}, {p90:.3f}]"


def _lower_share(canary: list[Answer], stable: list[Answer]) -> float:
    """P(a canary answer's confidence < a stable one's), ties counted half: the AUC detector B
    builds on."""
    u = stats.mannwhitneyu([a.confidence for a in canary], [a.confidence for a in stable]).statistic
    return 1 - float(u) / (len(canary) * len(stable))


def answers_table(pools: dict[str, dict[str, list[Answer]]], n: int) -> Table:
    table = Table(
        "temperature",
        "version",
        "format valid",
        "correct",
        "confidence median [p10, p90]",
        "mean",
        "correct answers' confidence",
        "wrong answers' confidence",
        "P(lower than stable)",
        title=f"answers ({n} held-out prompts per version; confidence = mean token "
        "log-probability, nats per token)",
    )
    for temperature, versions in pools.items():
        for name, answers in versions.items():
            confidences = [a.confidence for a in answers]
            table.add_row(
                temperature,
                name,
                _rate([a.valid for a in answers]),
                _rate([a.correct for a in answers]),
                _quantiles(confidences),
                f"{np.mean(confidences):.3f}",
                _quantiles([a.confidence for a in answers if a.correct]),
                _quantiles([a.confidence for a in answers if not a.correct]),
                "-" if name == "stable" else f"{_lower_share(answers, versions['stable']):.3f}",
            )
    return table


def _found(found: list[int | None]) -> str:
    """detected / orderings: median / p90 requests"""
    hits = [n for n in found if n is not None]
    samples = f": {statistics.median(hits):.0f} / {np.quantile(hits, 0.9):.0f}" if hits else ""
    return f"{len(hits)}/{len(found)}{samples}"


def _sooner(first: list[int | None], second: list[int | None]) -> str:
    """Paired over orderings: how often `second` detects before `first`, and by how many requests
    (median)."""
    pairs = [(a, b) for a, b in zip(first, second) if a is not None or b is not None]
    if not pairs:
        return "-"
    sooner = sum(b is not None and (a is None or b < a) for a, b in pairs)
    later = sum(a is not None and (b is None or a < b) for a, b in pairs)
    both = [a - b for a, b in pairs if a is not None and b is not None]
    gain = f"; median A - B {statistics.median(both):+.0f}" if both else ""
    return f"{sooner} sooner, {len(pairs) - sooner - later} same, {later} later{gain}"


def detection_table(
    results: dict[tuple[str, str], dict[str, list[int | None]]], pools, args: argparse.Namespace
) -> Table:
    table = Table(
        "temperature",
        "canary",
        "invalid",
        "wrong",
        "A: format",
        "B: confidence ranks",
        "C: confidence mean",
        "B vs A (paired orderings)",
        title=f"detected / orderings: median / p90 canary requests to detection (a look every "
        f"{args.look_every} requests per variant, alpha {LIMITS.alpha} spent over looks, budget "
        f"{args.budget}; A margin {LIMITS.format_margin}; B, C relative tolerance "
        f"{args.tolerance}). On a good canary a detection is a false alarm.",
    )
    for (temperature, name), found in results.items():
        answers = pools[temperature][name]
        table.add_row(
            temperature,
            name,
            _rate([not a.valid for a in answers]),
            _rate([not a.correct for a in answers]),
            *(_found(found[d]) for d in "ABC"),
            _sooner(found["A"], found["B"]),
        )
    return table


def check(results: dict[tuple[str, str], dict[str, list[int | None]]]) -> list[str]:
    """Goals for B that held on every run here: at most 5 % false alarms on each good canary, and
    the format-breaking (bad) canary caught within the budget in at least 95 % of the orderings.
    (A is not checked: at temperature 1 a good canary's 300 answers can be a few points less
    valid than the stable's, and the resampling takes that for a real difference.)"""
    misses = []
    for (temperature, name), found in results.items():
        rate = sum(n is not None for n in found["B"]) / len(found["B"])
        if name.startswith("good") and rate > 0.05:
            misses.append(f"t={temperature} {name} canary: B false alarms {rate:.1%} > 5%")
        if name == "bad" and rate < 0.95:
            misses.append(f"t={temperature} bad canary: B detected {rate:.1%} < 95%")
    return misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prompts", type=int, default=300, help="held-out prompts each version answers"
    )
    parser.add_argument("--orderings", type=int, default=200, help="resampled orderings per canary")
    parser.add_argument("--budget", type=int, default=500, help="canary samples before giving up")
    parser.add_argument(
        "--look-every", type=int, default=10, help="requests per variant between looks"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.25,
        help="relative: how much lower (more negative) the canary's confidence may be",
    )
    parser.add_argument("--temperatures", default="0,1", help="comma-separated; 0 is greedy")
    parser.add_argument(
        "--quick", action="store_true", help="100 prompts, greedy only, 50 orderings"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a goal of B is missed (see check)"
    )
    parser.add_argument(
        "--work", type=Path, help="keep the world here (default: a temporary folder)"
    )
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.orderings, args.temperatures = 100, 50, "0"
    temperatures = [float(t) for t in args.temperatures.split(",")]

    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafleet-bench-confidence-"))
    try:
        base, adapters = build_world(work)
        adapters |= train_canaries(work, base)
        prompts, references = held_out(args.prompts, seed=11)
        # the answers of an earlier run with the same world, prompts and temperatures (--work) are
        # reused
        cache = (
            work
            / f"answers-{len(prompts)}-{'_'.join(map(str, temperatures))}-{'_'.join(adapters)}.json"
        )
        t1 = time.perf_counter()
        if cache.exists():
            generated = json.loads(cache.read_text())
        else:
            with console.status(
                f"{len(adapters)} versions answer {len(prompts)} prompts at t={args.temperatures}"
            ):
                generated = generate(base, adapters, prompts, temperatures)
            cache.write_text(json.dumps(generated))
        generation_s = time.perf_counter() - t1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    pools = {
        t: {name: score(answers, references) for name, answers in versions.items()}
        for t, versions in generated.items()
    }
    for versions in pools.values():
        versions["subtle (20% bad)"] = _subtle(versions["good"], versions["bad"], seed=1)
    console.print(answers_table(pools, len(prompts)))

    detectors = {
        "A": format_harm,
        "B": confidence_rank_harm(args.tolerance),
        "C": confidence_mean_harm(args.tolerance),
    }
    results = {}
    for temperature, versions in pools.items():
        for name in [v for v in versions if v != "stable"]:
            with console.status(
                f"{args.orderings} orderings of the {name} canary at t={temperature}"
            ):
                results[temperature, name] = detect(
                    versions["stable"],
                    versions[name],
                    detectors,
                    args.orderings,
                    args.budget,
                    args.look_every,
                )
    console.print(detection_table(results, pools, args))
    console.print(f"generation {generation_s:.0f} s; wall {time.perf_counter() - t0:.0f} s")
    if args.check and (misses := check(results)):
        for miss in misses:
            console.print(f"[red]missed: {miss}")
        raise SystemExit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine"]:  # the generation child (generate)
        _engine(sys.argv[2], sys.argv[3])
    else:
        main()
