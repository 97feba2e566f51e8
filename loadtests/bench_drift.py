"""Decision quality of input-drift monitoring: detection delay and false alarms, on the real engine.

The deployment's validation set is 100 requests of the shapes world's general task. Live traffic is
drawn from the same distribution (fresh pictures), then shifted: darkened images, images rotated by
30 degrees (black corners, larger canvas), images rotated by 90 degrees (square pictures: invisible
to cheap image statistics), images twice as large, and longer prompts.

1. End to end: `lorafleet serve` with its drift monitor (window 50, a look per second), a fresh
   deployment per trial: 100 calm requests, then shifted ones until the monitor raises its input
   alarm (or 300 were sent). The delay is counted in shifted requests sent before the alarm was seen
   (an upper bound: the client polls after each batch of 10).
2. Resampled: the monitor's features are functions of the requests alone, so many more trials run
   through the same code (`lorafleet.serve.drift.statistics.input_drift`, the same window, look
   counter and alpha spending): false alarms over 1,000 calm samples (20 looks) and the exact delay
   per shift.

    .venv/bin/python loadtests/bench_drift.py [--real-trials 2] [--trials 200] [--base DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image
from rich.console import Console
from rich.table import Table

from lorafleet.chat_jsonl import image_data_url
from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.drift.statistics import input_drift, request_features
from lorafleet.serve.gateway_client import LorafleetClient
from lorafleet.train.shapes import make_example, write_task

console = Console(width=150)
WINDOW = 50
ALPHA = 0.05
LONG_PROMPT = (
    "Please look carefully at the picture, take your time, and then tell me: what is in the image?"
)

Shift = tuple[Callable[[Image.Image], Image.Image], str | None]
SHIFTS: dict[str, Shift] = {
    "none": (lambda im: im, None),
    "darkened (x0.5)": (lambda im: im.point(lambda v: v // 2), None),
    "slightly darker (x0.9)": (lambda im: im.point(lambda v: int(v * 0.9)), None),
    "rotated 30 deg": (lambda im: im.rotate(30, expand=True), None),
    "rotated 90 deg": (lambda im: im.rotate(90), None),
    "resized x2": (lambda im: im.resize((im.width * 2, im.height * 2)), None),
    "longer prompt": (lambda im: im, LONG_PROMPT),
}


def requests(n: int, rng: random.Random, shift: Shift) -> list[list[dict]]:
    transform, prompt = shift
    out = []
    for _ in range(n):
        image, question, _ = make_example("general", rng)
        out.append(
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": image_data_url(transform(image))},
                        },
                        {"type": "text", "text": prompt or question},
                    ],
                }
            ]
        )
    return out


# --- resampled trials: the monitor's own statistics on feature streams ---


def stream_trial(
    reference: list[dict],
    calm: list[dict],
    shifted: list[dict],
    calm_n: int,
    shifted_n: int,
    rng: random.Random,
    permutations: int,
) -> tuple[bool, int | None]:
    """(false alarm during the calm phase, shifted samples until the alarm or None) for one
    stream."""
    stream = rng.choices(calm, k=calm_n) + rng.choices(shifted, k=shifted_n)
    for look, end in enumerate(range(WINDOW, len(stream) + 1, WINDOW), start=1):
        result = input_drift(
            reference,
            stream[end - WINDOW : end],
            look,
            ALPHA,
            permutations,
            seed=rng.randrange(10**6),
        )
        if result.drifted:
            return (True, None) if end <= calm_n else (False, end - calm_n)
    return False, None


def _features(batch: list[list[dict]]) -> list[dict]:
    return [request_features(messages) for messages in batch]


# --- end to end ---


def real_trial(
    server: LocalServer,
    key: str,
    name: str,
    adapter: str,
    validation: Path,
    shift: Shift,
    rng: random.Random,
) -> tuple[bool, int | None, float]:
    client = LorafleetClient(server.url, key)
    client.deploy(name, adapter)
    client.push_validation(name, validation, "exact_match")
    http = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )

    def send(batch: list[list[dict]]) -> None:
        def one(messages: list[dict]) -> None:
            http.post(
                "/v1/chat/completions",
                json={"model": name, "messages": messages, "max_tokens": 4, "temperature": 0},
            ).raise_for_status()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, batch))

    def alarmed() -> bool:
        status = http.get(f"/v1/deployments/{name}/drift").json()
        return bool(status["input"] and status["input"]["drifted"])

    t0 = time.monotonic()
    send(requests(100, rng, SHIFTS["none"]))
    time.sleep(2.5)  # the monitor saves and looks every second
    false_alarm, sent = alarmed(), 0
    while sent < 300 and not false_alarm:
        send(requests(10, rng, shift))
        sent += 10
        time.sleep(1.2)
        if alarmed():
            return False, sent, time.monotonic() - t0
    return false_alarm, None, time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-trials", type=int, default=2, help="end-to-end trials per shift")
    parser.add_argument("--trials", type=int, default=200, help="resampled trials per shift")
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--base", type=Path, help="a tiny base built before (default: build one)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-drift-"))
    try:
        validation = write_task("general", 100, work / "val.jsonl", seed=1)
        from lorafleet.chat_jsonl import load_jsonl, request_messages

        reference = _features([request_messages(e) for e in load_jsonl(validation)])
        pool_rng = random.Random(7)
        pools = {name: _features(requests(600, pool_rng, shift)) for name, shift in SHIFTS.items()}

        table = Table(
            "shift",
            "trials",
            "false alarms (calm phase)",
            "detected",
            "delay in samples (median / p95 / max)",
            title=f"input drift, resampled (window {WINDOW}, alpha {ALPHA} spent over looks, "
            f"{args.permutations} permutations)",
        )
        rng = random.Random(0)
        for name in SHIFTS:
            with console.status(f"{args.trials} resampled trials: {name}"):
                calm_n, shifted_n = (1000, 0) if name == "none" else (100, 300)
                runs = [
                    stream_trial(
                        reference,
                        pools["none"],
                        pools[name],
                        calm_n,
                        shifted_n,
                        rng,
                        args.permutations,
                    )
                    for _ in range(args.trials)
                ]
            delays = [d for _, d in runs if d is not None]
            q = (
                statistics.quantiles(delays, n=20, method="inclusive")[18]
                if len(delays) > 1
                else (delays or [0])[0]
            )
            table.add_row(
                name + (" (1,000 calm samples, 20 looks)" if name == "none" else ""),
                str(len(runs)),
                f"{sum(f for f, _ in runs)} ({sum(f for f, _ in runs) / len(runs):.1%})",
                "-" if name == "none" else f"{len(delays)} ({len(delays) / len(runs):.0%})",
                f"{statistics.median(delays):.0f} / {q:.0f} / {max(delays)}" if delays else "-",
            )
        console.print(table)

        if args.real_trials:
            from lorafleet.train.random_adapter import make_random_adapter
            from lorafleet.train.tiny_model import PRETRAIN_STEPS, build_tiny_model

            with console.status("building the tiny base and starting lorafleet serve"):
                base = args.base or build_tiny_model(
                    work / "base", seed=0, pretrain_steps=PRETRAIN_STEPS
                )
                # ~ base; B = 0 refused
                adapter = make_random_adapter(base, work / "adapter", seed=0, rank=8, std=1e-6)
                server = LocalServer.start(
                    base,
                    work / "home",
                    max_model_len="512",
                    drift_look_s="1",
                    drift_window=str(WINDOW),
                    drift_reservoir="64",
                    drift_replay_s="0",
                    dtype="float32",
                )
                server.wait_ready()
            try:
                key = LorafleetClient(server.url, server.admin_key).create_tenant("acme")["api_key"]
                client = LorafleetClient(server.url, key)
                ref = f"m@{client.push_adapter('m', adapter)['version']}"
                real = Table(
                    "shift",
                    "trials",
                    "false alarms (100 calm)",
                    "detected",
                    "shifted requests until the alarm was seen",
                    "seconds per trial",
                    title="input drift, end to end (lorafleet serve, real engine)",
                )
                trial_rng = random.Random(1)
                for i, (name, shift) in enumerate((n, s) for n, s in SHIFTS.items() if n != "none"):
                    results = []
                    for t in range(args.real_trials):
                        with console.status(f"end-to-end trial {t + 1}: {name}"):
                            results.append(
                                real_trial(
                                    server, key, f"d{i}-{t}", ref, validation, shift, trial_rng
                                )
                            )
                    delays = [d for _, d, _ in results if d is not None]
                    real.add_row(
                        name,
                        str(len(results)),
                        str(sum(f for f, _, _ in results)),
                        str(len(delays)),
                        ", ".join(map(str, delays)) or "-",
                        f"{statistics.median(s for _, _, s in results):.0f}",
                    )
                console.print(real)
            finally:
                server.stop()
    except BaseException:
        console.print(f"[red]failed; the work folder (server logs) is kept: {work}[/red]")
        raise
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
