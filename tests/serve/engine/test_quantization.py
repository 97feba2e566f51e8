"""A quantized base: `lorafleet quantize`, serving the checkpoint with hot-swapped adapters on
the real engine, and the decisions about what this hardware can run (pure, on synthetic machines
and checkpoint configs)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lorafleet.adapters.base_model import load_base_spec
from lorafleet.errors import InvalidRequest, UnsupportedQuantization
from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.engine.command import engine_command
from lorafleet.serve.engine.hardware import Hardware, plan_quantization
from lorafleet.serve.gateway_client import LorafleetClient
from lorafleet.serve.settings import Settings
from tests.helpers import image_messages

AVX2 = Hardware("x86_64", frozenset({"avx", "avx2", "fma"}))
AVX512 = Hardware("x86_64", frozenset({"avx", "avx2", "avx512f", "avx512_bf16"}))
OLD_CPU = Hardware("x86_64", frozenset({"sse4_2"}))
V100 = Hardware("x86_64", AVX2.cpu_flags, "Tesla V100-SXM2-16GB", (7, 0))
A100 = Hardware("x86_64", AVX2.cpu_flags, "NVIDIA A100-SXM4-80GB", (8, 0))
H100 = Hardware("x86_64", AVX2.cpu_flags, "NVIDIA H100 80GB HBM3", (9, 0))

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
W8A8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
            "input_activations": {
                "num_bits": 8,
                "type": "int",
                "strategy": "token",
                "dynamic": True,
            },
        }
    },
}
BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True}


def lorafleet_each(
    runs: list[tuple[tuple[str | Path, ...], dict[str, str]]], timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """Independent CLI runs (arguments, settings), three at a time: each spends seconds importing
    on one core."""
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda run: lorafleet(*run[0], timeout=timeout, **run[1]), runs))


def lorafleet(
    *args: str | Path, timeout: float = 300, **settings: str
) -> subprocess.CompletedProcess:
    """The CLI as users run it, without the developer's LORAFLEET_* settings, on wide lines (no
    wrapping)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")} | {
        "COLUMNS": "400"
    }
    env.update({f"LORAFLEET_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.serve.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        timeout=timeout,
        env=env,
    )


def checkpoint_with(tiny_model: Path, folder: Path, quantization: dict) -> Path:
    """The tiny model's files with a `quantization_config` claimed in config.json (only the
    config is read)."""
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    return folder


def plan(
    base: Path, hw: Hardware, requested: str = "auto", group_size: int = 32, dtype: str = "auto"
):
    return plan_quantization(requested, group_size, str(base), load_base_spec(str(base)), hw, dtype)


@pytest.fixture(scope="module")
def quantized(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lorafleet quantize` of the tiny base, int4 with groups of 32, through the CLI."""
    out = tmp_path_factory.mktemp("quantized") / "tiny-int4"
    run = lorafleet(
        "quantize", "--base", tiny_model, "--out", out, "--scheme", "int4", "--group-size", "32"
    )
    assert run.returncode == 0, run.stderr
    assert "14 language-model layers quantized to int4" in run.stdout and "visual" in run.stdout
    return out


# --- lorafleet quantize ---


def test_quantize_writes_a_torchao_checkpoint_and_its_manifest(quantized: Path, tiny_model: Path):
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao"
    assert config["quant_type"]["default"]["_type"] == "IntxWeightOnlyConfig"
    assert "visual" in config["modules_to_not_convert"]  # the vision tower stays in full precision
    manifest = json.loads((quantized / "lorafleet-quantization.json").read_text())
    assert (
        manifest["scheme"] == "int4"
        and manifest["group_size"] == 32
        and manifest["base"] == str(tiny_model)
    )
    # float32 weights -> int8-held int4 values + a scale and zero point per 32: 3.5x smaller
    assert 3.0 < manifest["weights_bytes_before"] / manifest["weights_bytes_after"] < 4.0
    assert (quantized / "tokenizer.json").is_file() and (
        quantized / "chat_template.jinja"
    ).is_file()


def test_quantize_refuses_bad_requests_and_leaves_nothing(
    quantized: Path, tiny_model: Path, tmp_path: Path
):
    cases = [
        (("--base", tiny_model, "--out", tmp_path / "g48", "--group-size", "48"), "multiple of it"),
        (
            ("--base", tiny_model, "--out", tmp_path / "int3", "--scheme", "int3"),
            "unknown scheme 'int3'",
        ),
        (
            ("--base", quantized, "--out", tmp_path / "twice"),
            "already quantized (torchao IntxWeightOnlyConfig)",
        ),
        (("--base", tiny_model, "--out", quantized), "already exists"),
    ]
    runs = lorafleet_each([(("quantize", *args), {}) for args, _ in cases])
    for (_, message), run in zip(cases, runs):
        assert run.returncode == 1 and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    # no half-written checkpoint, no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- serving the quantized checkpoint ---


@pytest.mark.engine
def test_quantized_checkpoint_serves_hot_swapped_adapters_like_vllm(
    quantized: Path, make_adapter, tmp_path: Path
):
    """`lorafleet serve --base DIR` on the quantized checkpoint: two tenants' adapters swap per
    request, each answers like vLLM with that adapter on the same checkpoint, and differs from
    the base and from the other."""
    from lorafleet.train.vllm_generate import generate

    # served in the dtype it was written in (float32 here) even when the engine's dtype is left to
    # vLLM
    assert plan(quantized, AVX2).dtype == "float32"
    with pytest.raises(
        UnsupportedQuantization, match="quantized in float32 and is served in float32 only"
    ):
        plan(quantized, AVX2, dtype="bfloat16")
    from openai import OpenAI

    server = LocalServer.start(
        quantized, tmp_path / "home", max_model_len="512", max_lora_rank="16", drift_replay_s="0"
    )  # dtype auto: the checkpoint's own
    try:
        server.wait_ready()
        admin = LorafleetClient(server.url, server.admin_key)
        engine = admin.http.get("/admin/engine").json()
        assert engine["quantization"] == "torchao IntxWeightOnlyConfig (from the checkpoint)"
        messages = image_messages()
        served = []
        for seed in (1, 2):
            key = admin.create_tenant(f"q{seed}")["api_key"]
            tenant = LorafleetClient(server.url, key)
            version = tenant.push_adapter("ext", make_adapter(seed))
            tenant.deploy("assistant", f"ext@{version['version']}")
            reply = OpenAI(
                base_url=server.url + "/v1", api_key=key, max_retries=0
            ).chat.completions.create(
                model="assistant", messages=messages, max_tokens=8, temperature=0
            )
            served.append(reply.choices[0].message.content)
    finally:
        server.stop()
    direct = generate(
        str(quantized),
        {"base": None, "a": str(make_adapter(1)), "b": str(make_adapter(2))},
        [messages],
        8,
        max_rank=16,
        dtype="float32",
    )
    texts = {name: outputs[0]["text"] for name, outputs in direct.items()}
    assert served == [texts["a"], texts["b"]]
    assert len(set(texts.values())) == 3  # base, adapter 1 and adapter 2 all answer differently


@pytest.mark.engine
def test_w4a16_checkpoint_serves_adapters_where_the_cpu_has_the_kernel(
    tiny_model: Path, tmp_path: Path, make_adapter
):
    """compressed-tensors W4A16 (packed 4-bit): served with LoRA on an AVX-512 CPU in bfloat16,
    refused elsewhere."""
    from lorafleet.serve.engine.hardware import detect_hardware
    from lorafleet.train.quantize import quantize
    from lorafleet.train.vllm_generate import generate

    out = Path(quantize(str(tiny_model), tmp_path / "w4a16", "w4a16", 32).out)
    manifest = json.loads((out / "lorafleet-quantization.json").read_text())
    # bf16 -> 4 bits + scales
    assert manifest["weights_bytes_before"] / manifest["weights_bytes_after"] > 3.0
    hw = detect_hardware()
    if "avx512f" not in hw.cpu_flags:
        with pytest.raises(UnsupportedQuantization, match="AVX-512"):
            plan(out, hw)
        return
    assert plan(out, hw).label == "compressed-tensors (from the checkpoint)"
    with pytest.raises(UnsupportedQuantization, match="bfloat16 only"):
        plan(out, hw, dtype="float32")
    messages = image_messages()
    texts = {
        name: outputs[0]["text"]
        for name, outputs in generate(
            str(out),
            {"base": None, "a": str(make_adapter(1)), "b": str(make_adapter(2))},
            [messages],
            8,
            max_rank=16,
            dtype="bfloat16",
        ).items()
    }
    assert len(set(texts.values())) == 3 and all(texts.values()), texts


def test_serve_refuses_what_this_machine_cannot_run_before_starting_an_engine(
    tiny_model: Path, quantized: Path, tmp_path: Path
):
    w8a8 = checkpoint_with(tiny_model, tmp_path / "w8a8", W8A8)
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    (text_only / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "vocab_size": 100,
            }
        )
    )
    cases = [
        ((tiny_model, "--quantize", "fp8"), "fp8 needs an NVIDIA GPU with compute capability 8.9"),
        ((quantized, "--quantize", "int8"), "is already quantized"),
        ((w8a8, "--quantize", "auto"), "cannot serve LoRA adapters on vLLM's CPU engine"),
        ((text_only, "--quantize", "auto"), "Qwen2ForCausalLM model, not a vision-language model"),
        ((tiny_model, "--quantize", "int3"), "unknown quantization 'int3'"),
        ((tiny_model, "--quantize", "w4a16"), "lorafleet quantize --scheme w4a16"),
    ]
    homes = [tmp_path / f"home{i}" for i in range(len(cases))]
    runs = lorafleet_each(
        [
            (("serve", "--base", base, *flags, "--home", home), {"development": "1"})
            for ((base, *flags), _), home in zip(cases, homes)
        ],
        timeout=120,
    )
    for (_, message), home, run in zip(cases, homes, runs):
        assert run.returncode == 1, (message, run.stdout, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr
        assert not (home / "logs" / "engine.log").exists()  # refused before any engine started


# --- what runs where (pure decisions) ---


def test_auto_quantizes_a_full_precision_base_to_int4_at_load_leaving_the_vision_tower(
    tiny_model: Path,
):
    chosen = plan(tiny_model, AVX2)
    assert chosen.label == "int4 (torchao weight-only, group 32, quantized at load)"
    assert chosen.engine_args[:2] == ("--quantization", "torchao")
    overrides = json.loads(chosen.llm_kwargs["hf_overrides"]["quantization_config_dict_json"])
    assert overrides["_data"]["module_fqn_to_config"]["visual"] is None
    cmd, _ = engine_command(Settings(base=str(tiny_model)), 9000, "token", False, chosen)
    assert all(isinstance(arg, str) for arg in cmd) and cmd[cmd.index("--dtype") + 1] == "auto"
    assert (
        plan(tiny_model, AVX2, "int8").label
        == "int8 (torchao weight-only, per row, quantized at load)"
    )
    assert plan(tiny_model, AVX2, "none").engine_args == ()
    assert plan(tiny_model, H100, "fp8").engine_args == ("--quantization", "fp8")


def test_a_checkpoint_is_served_with_its_own_quantization_where_the_hardware_has_the_kernel(
    tiny_model, tmp_path
):
    awq = checkpoint_with(tiny_model, tmp_path / "awq", AWQ)
    assert (
        plan(awq, A100).label == "awq 4-bit (from the checkpoint)"
        and plan(awq, A100).engine_args == ()
    )
    assert plan(awq, AVX512).label == "awq 4-bit (from the checkpoint)"
    with pytest.raises(
        UnsupportedQuantization, match="cpu_gemm_wna16 kernel, built only for CPUs with AVX-512"
    ):
        plan(awq, AVX2)
    with pytest.raises(UnsupportedQuantization, match="bfloat16 only"):
        plan(awq, AVX512, dtype="float32")
    with pytest.raises(
        UnsupportedQuantization, match=r"Marlin kernels, which need compute capability 8\.0.*V100"
    ):
        plan(awq, V100)
    with pytest.raises(UnsupportedQuantization, match="already quantized"):
        plan(awq, A100, "int4")
    w8a8 = checkpoint_with(tiny_model, tmp_path / "w8a8", W8A8)
    assert plan(w8a8, A100).label == "compressed-tensors (from the checkpoint)"
    with pytest.raises(
        UnsupportedQuantization, match="int8 layers cannot be wrapped by LoRA layers"
    ):
        plan(w8a8, AVX512)
    with pytest.raises(UnsupportedQuantization, match="removed in 0.32"):
        plan(checkpoint_with(tiny_model, tmp_path / "bnb", BNB), H100)
    with pytest.raises(UnsupportedQuantization, match="does not serve hqq"):
        plan(checkpoint_with(tiny_model, tmp_path / "hqq", {"quant_method": "hqq"}), H100)


def test_requests_the_hardware_cannot_run_name_what_they_need(tiny_model: Path):
    with pytest.raises(
        UnsupportedQuantization, match=r"8\.9 or newer.*no NVIDIA GPU \(x86_64 CPU, AVX2, no GPU\)"
    ):
        plan(tiny_model, AVX2, "fp8")
    with pytest.raises(UnsupportedQuantization, match=r"8\.9 or newer.*A100"):
        plan(tiny_model, A100, "fp8")
    with pytest.raises(
        UnsupportedQuantization, match=r"compute capability 7\.5 or newer \(Turing\+\).*V100"
    ):
        plan(tiny_model, V100, "int4")
    assert plan(tiny_model, V100).label.startswith(
        "none (full precision: torchao needs compute capability 7.5+"
    )
    with pytest.raises(UnsupportedQuantization, match="needs a CPU with AVX2"):
        plan(tiny_model, OLD_CPU)
    with pytest.raises(InvalidRequest, match="--group-size 128 or --scheme int8"):
        plan(tiny_model, AVX2, "int4", group_size=48)
