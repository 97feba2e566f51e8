"""Decision quality of canary rollouts, on the real engine with real trained adapters.

The deployment answers JSON (`{"shape": ..., "color": ...}`, declared as its answer format). Its
stable version is a JSON adapter trained on the shapes world; the good canary is the same recipe
retrained with another seed (equal quality, other weights); the bad canary was trained for one-word
French colours, so it breaks the JSON format.

1. End to end: `lorafleet serve`, rollouts started through the API (steps 10,25,50,100, gate skipped
   so the live analysis is what is measured; the gate's own verdict on each candidate is printed
   first), traffic from distinct users until the controller decides.
2. Resampled: per-request outcomes (status, latency, format validity) recorded from the same engine,
   interleaved across the three versions, then many more trials than real time allows through the
   same pure code the controller runs each tick (`lorafleet.serve.rollouts.state.plan_tick`), on a
   simulated clock with the measured request rate and the server's tick. A "subtle" canary (20 % of
   its answers broken) shows the power limit.

    .venv/bin/python loadtests/bench_rollout.py [--real-trials 3] [--trials 1000] [--record 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from lorafleet.serve.answer_format import answer_checker
from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.gateway_client import LorafleetClient
from lorafleet.serve.rollouts.routing import BUCKETS, bucket_of
from lorafleet.serve.rollouts.state import CanaryView, RolloutStart, plan_tick
from lorafleet.serve.rollouts.statistics import VariantSamples

console = Console(width=160)
JSON_FORMAT = {
    "json_schema": {
        "type": "object",
        "required": ["shape", "color"],
        "additionalProperties": False,
        "properties": {"shape": {"type": "string"}, "color": {"type": "string"}},
    }
}
STEPS = [10, 25, 50, 100]
TICK_S = 1.0
CONCURRENCY = 8
# 60 items cannot show non-inferiority at a 0.05 margin with a few discordant pairs
GATE_ITEMS = 200


# --- the world: base, three adapters, a server ---


def build_world(work: Path) -> tuple[Path, dict[str, Path]]:
    from transformers.utils import logging as hf_logging

    from lorafleet.train.config import load_config
    from lorafleet.train.shapes import write_task
    from lorafleet.train.tiny_model import PRETRAIN_STEPS, build_tiny_model
    from lorafleet.train.trainer import train

    hf_logging.disable_progress_bar()
    names = {"stable": ("json", 0), "good": ("json", 1), "bad": ("french", 0)}
    adapters = {name: work / f"adapter-{name}" for name in names}
    data = work / "data"
    for task in ("json", "french", "general"):
        write_task(task, 400, data / f"{task}-train.jsonl", seed=0)
        write_task(task, 60, data / f"{task}-val.jsonl", seed=1)
    # the deployment's validation set
    write_task("json", GATE_ITEMS, data / "json-gate.jsonl", seed=2)
    if all((folder / "adapter_config.json").exists() for folder in adapters.values()):
        return work / "base", adapters  # --work of an earlier run
    with console.status("building and pre-training the tiny base (~2 min)"):
        base = build_tiny_model(work / "base", seed=0, pretrain_steps=PRETRAIN_STEPS)
    for name, (task, seed) in names.items():
        config = load_config(
            None,
            base=str(base),
            train=data / f"{task}-train.jsonl",
            val=data / f"{task}-val.jsonl",
            mix=data / "general-train.jsonl",
            out=work / f"adapter-{name}",
            rank=16,
            lr=2e-3,
            epochs=2,
            batch_size=16,
            eval_every=25,
            seed=seed,
        )
        with console.status(f"training the {name} adapter ({task}, seed {seed})"):
            train(config, progress=False)
    return base, adapters


def _requests(n: int, seed: int) -> list[list[dict]]:
    """JSON-task prompts about fresh pictures, as clients send them."""
    from lorafleet.chat_jsonl import image_data_url
    from lorafleet.train.shapes import make_example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image, question, _ = make_example("json", rng)
        out.append(
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
    return out


@dataclass
class Outcome:
    ok: bool
    latency_s: float
    format_valid: bool | None
    output_tokens: int
    variant: str = ""


async def _send(
    http: httpx.AsyncClient, model: str, messages: list[dict], user: str, check
) -> Outcome:
    t0 = time.perf_counter()
    response = await http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": messages,
            "user": user,
            "max_tokens": 24,
            "temperature": 0,
        },
    )
    latency = time.perf_counter() - t0
    if response.status_code != 200:
        return Outcome(False, latency, None, 0, response.headers.get("x-lorafleet-variant", ""))
    body = response.json()
    return Outcome(
        True,
        latency,
        check(body["choices"][0]["message"]["content"] or ""),
        body["usage"]["completion_tokens"],
        response.headers["x-lorafleet-variant"],
    )


# --- part 1: end to end ---


@dataclass
class RealTrial:
    candidate: str
    outcome: str
    reason: str
    canary_requests: int  # canary requests in the step where the decision was taken
    total_requests: int
    seconds: float
    step_index: int  # the step at which the decision was taken


async def real_trial(
    server: LocalServer,
    key: str,
    versions: dict[str, str],
    candidate: str,
    prompts,
    seed: int,
    min_requests: int,
    interval_s: float,
    timeout: float,
) -> RealTrial:
    admin = LorafleetClient(server.url, key)
    admin.deploy("answers", versions["stable"])  # every trial starts from the same stable
    admin.start_rollout(
        "answers",
        to=versions[candidate],
        gate=False,
        steps=STEPS,
        min_requests=min_requests,
        interval_s=interval_s,
    )
    check = answer_checker(JSON_FORMAT)
    sent, t0, rng = 0, time.monotonic(), random.Random(seed)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as http:
        while time.monotonic() - t0 < timeout:
            batch = [
                _send(http, "answers", rng.choice(prompts), uuid.uuid4().hex, check)
                for _ in range(CONCURRENCY)
            ]
            await asyncio.gather(*batch)
            sent += CONCURRENCY
            rollout = (await http.get("/v1/deployments/answers/rollout")).json()
            if rollout["phase"] in ("Promoted", "RolledBack"):
                break
    decision = rollout["decisions"][-1]
    canary_n = max(
        (n["n_candidate"] for n in decision["numbers"] if n["metric"] != "sample_ratio"), default=0
    )
    if rollout["phase"] not in ("Promoted", "RolledBack"):
        admin.rollout_action("answers", "abort")
    return RealTrial(
        candidate,
        rollout["phase"],
        decision["reason"],
        canary_n,
        sent,
        time.monotonic() - t0,
        rollout["step_index"],
    )


async def record(
    server: LocalServer, key: str, prompts, per_version: int
) -> dict[str, list[Outcome]]:
    """Per-request outcomes of each version, interleaved so machine noise hits all alike."""
    check = answer_checker(JSON_FORMAT)
    pools: dict[str, list[Outcome]] = {name: [] for name in ("stable", "good", "bad")}
    jobs = [(name, i) for i in range(per_version) for name in pools]
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as http:

        async def one(name: str, i: int) -> None:
            async with gate:
                pools[name].append(
                    await _send(http, f"only-{name}", prompts[i % len(prompts)], f"r{i}", check)
                )

        await asyncio.gather(*(one(name, i) for name, i in jobs))
    return pools


# --- part 2: resampled trials through the controller's pure decision code ---


@dataclass
class _Step:
    requests: dict[str, int] = field(default_factory=lambda: {"canary": 0, "stable": 0})
    errors: dict[str, int] = field(default_factory=lambda: {"canary": 0, "stable": 0})
    invalid: dict[str, int] = field(default_factory=lambda: {"canary": 0, "stable": 0})
    checked: dict[str, int] = field(default_factory=lambda: {"canary": 0, "stable": 0})
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"canary": [], "stable": []})

    def add(self, label: str, o: Outcome) -> None:
        self.requests[label] += 1
        self.errors[label] += not o.ok
        if o.ok:
            self.latencies[label].append(o.latency_s)
        if o.format_valid is not None:
            self.checked[label] += 1
            self.invalid[label] += not o.format_valid

    def samples(self) -> dict[str, VariantSamples]:
        # every request is a distinct user in this traffic, so units == requests
        return {
            label: VariantSamples(
                requests=self.requests[label],
                errors=self.errors[label],
                units=self.requests[label],
                latencies_s=self.latencies[label],
                format_checked=self.checked[label],
                format_invalid=self.invalid[label],
            )
            for label in ("canary", "stable")
        }


def simulate(
    stable: list[Outcome],
    canary: list[Outcome],
    params: RolloutStart,
    rate: float,
    seed: int,
    max_requests: int = 100_000,
) -> tuple[str, str, int, int]:
    """One rollout on a simulated clock: (outcome, reason, canary requests of the deciding step,
    step index)."""
    rng = random.Random(seed)
    salt = f"{seed:x}"
    step_index, looks, started, last_look, last_look_requests = 0, 0, 0.0, 0.0, 0
    step, now, next_tick = _Step(), 0.0, TICK_S
    for i in range(max_requests):
        now = i / rate
        weight = params.steps[step_index]
        label = (
            "canary"
            if bucket_of(salt, "t", "d", f"user:{i}") < weight * BUCKETS / 100
            else "stable"
        )
        step.add(label, rng.choice(canary if label == "canary" else stable))
        if now < next_tick:
            continue
        next_tick += TICK_S
        view = CanaryView(
            step_index, params.steps, looks, started, last_look, last_look_requests, params
        )
        samples = step.samples()
        tick = plan_tick(view, samples, now)
        if tick is None:
            continue
        looks, last_look, last_look_requests = looks + 1, now, samples["canary"].requests
        if tick.action in ("rollback", "promote"):
            return tick.action, tick.reason, samples["canary"].requests, step_index
        if tick.action == "advance":
            step_index, started, last_look, last_look_requests, step = (
                step_index + 1,
                now,
                now,
                0,
                _Step(),
            )
    return "undecided", "", step.requests["canary"], step_index


def _subtle(good: list[Outcome], bad: list[Outcome], broken: float, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    return [rng.choice(bad) if rng.random() < broken else o for o in good]


def _summary(values: list[int]) -> str:
    if not values:
        return "-"
    q = (
        statistics.quantiles(values, n=20, method="inclusive")
        if len(values) > 1
        else [values[0]] * 19
    )
    return f"{statistics.median(values):.0f} / {q[18]:.0f} / {max(values)}"


def _reasons(reasons: list[str]) -> str:
    return ", ".join(
        f"{reason} x{n}" for reason, n in Counter(r for r in reasons if r).most_common()
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--real-trials", type=int, default=3, help="end-to-end trials per candidate"
    )
    parser.add_argument("--trials", type=int, default=1000, help="resampled trials per candidate")
    parser.add_argument("--record", type=int, default=300, help="recorded requests per version")
    parser.add_argument("--min-requests", type=int, default=100)
    parser.add_argument(
        "--interval", type=float, default=10.0, help="seconds per step at least (end to end)"
    )
    parser.add_argument(
        "--work", type=Path, help="keep the world here (default: a temporary folder)"
    )
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="lorafleet-bench-rollout-"))
    base, adapters = build_world(work)
    shutil.rmtree(work / "home", ignore_errors=True)  # a fresh catalog each run
    server = LocalServer.start(
        base, work / "home", max_model_len="512", rollout_tick_s=str(TICK_S), dtype="float32"
    )
    try:
        with console.status("starting lorafleet serve"):
            server.wait_ready()
        key = LorafleetClient(server.url, server.admin_key).create_tenant("acme")["api_key"]
        client = LorafleetClient(server.url, key)
        versions = {
            name: f"json@{client.push_adapter('json', folder)['version']}"
            for name, folder in adapters.items()
        }
        for deployment, version in [("answers", versions["stable"])] + [
            (f"only-{n}", v) for n, v in versions.items()
        ]:
            client.deploy(deployment, version)
            client.set_answer_format(deployment, JSON_FORMAT)
        client.push_validation("answers", work / "data" / "json-gate.jsonl", "exact_match")
        prompts = _requests(200, seed=7)

        gate = Table(
            "candidate",
            "gate verdict",
            "evidence",
            title=f"validation gate ({GATE_ITEMS} items, greedy)",
        )
        for candidate in ("good", "bad"):
            client.deploy("answers", versions["stable"])
            client.start_rollout(
                "answers", to=versions[candidate], gate=True, min_requests=10**6, interval_s=3600
            )
            while (rollout := client.rollout("answers"))["phase"] == "Gating":
                time.sleep(0.5)
            gate.add_row(candidate, rollout["reason"], rollout["gate"]["measurement"]["message"])
            if rollout["phase"] == "Progressing":
                client.rollout_action("answers", "abort")
        console.print(gate)

        real: list[RealTrial] = []
        for trial in range(args.real_trials):
            for candidate in ("bad", "good"):
                real.append(
                    await real_trial(
                        server,
                        key,
                        versions,
                        candidate,
                        prompts,
                        trial,
                        args.min_requests,
                        args.interval,
                        timeout=900,
                    )
                )
                console.print(f"end-to-end trial {trial + 1}, {candidate} canary: {real[-1]}")
        with console.status(f"recording {args.record} requests per version, interleaved"):
            t0 = time.perf_counter()
            pools = await record(server, key, prompts, args.record)
            rate = 3 * args.record / (time.perf_counter() - t0)
    finally:
        server.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    pooled = Table(
        "version",
        "requests",
        "error rate",
        "format valid",
        "median latency (ms)",
        "mean tokens",
        title=f"recorded outcomes (interleaved, concurrency {CONCURRENCY}, {rate:.1f} req/s)",
    )
    for name, pool in pools.items():
        ok = [o for o in pool if o.ok]
        pooled.add_row(
            name,
            str(len(pool)),
            f"{1 - len(ok) / len(pool):.3f}",
            f"{statistics.mean(o.format_valid for o in ok):.3f}",
            f"{statistics.median(o.latency_s for o in ok) * 1000:.0f}",
            f"{statistics.mean(o.output_tokens for o in ok):.1f}",
        )
    console.print(pooled)

    params = RolloutStart(
        to="x", steps=STEPS, min_requests=args.min_requests, interval_s=args.interval
    )
    canaries = {
        "bad": pools["bad"],
        "good": pools["good"],
        "subtle (20% broken)": _subtle(pools["good"], pools["bad"], 0.2, seed=1),
    }
    table = Table(
        "canary",
        "trials",
        "rolled back",
        "promoted",
        "canary requests at rollback (median / p95 / max)",
        "rolled back at the 10% step",
        "decisions",
        title="decision quality (steps 10,25,50,100; "
        f"min-requests {args.min_requests}; interval {args.interval:g} s; tick {TICK_S:g} s)",
    )
    for name, canary in canaries.items():
        with console.status(f"{args.trials} resampled trials of the {name} canary"):
            runs = [
                simulate(pools["stable"], canary, params, rate, seed) for seed in range(args.trials)
            ]
        back = [n for outcome, _, n, _ in runs if outcome == "rollback"]
        table.add_row(
            f"{name} (resampled)",
            str(len(runs)),
            f"{len(back)} ({len(back) / len(runs):.1%})",
            str(sum(outcome == "promote" for outcome, *_ in runs)),
            _summary(back),
            str(sum(outcome == "rollback" and step == 0 for outcome, _, _, step in runs)),
            _reasons([reason for outcome, reason, _, _ in runs if outcome == "rollback"]),
        )
    for name in ("bad", "good"):
        runs = [t for t in real if t.candidate == name]
        back = [t.canary_requests for t in runs if t.outcome == "RolledBack"]
        seconds = statistics.median(t.seconds for t in runs) if runs else 0
        table.add_row(
            f"{name} (end to end)",
            str(len(runs)),
            str(len(back)),
            str(sum(t.outcome == "Promoted" for t in runs)),
            _summary(back),
            str(sum(t.outcome == "RolledBack" and t.step_index == 0 for t in runs)),
            f"{_reasons([t.reason for t in runs])}; median {seconds:.0f} s per trial",
        )
    console.print(table)
    console.print(json.dumps({"rate_rps": rate, "real": [t.__dict__ for t in real]}))


if __name__ == "__main__":
    asyncio.run(main())
