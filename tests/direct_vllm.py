"""Reference outputs straight from vLLM (offline `LLM`, `LoRARequest` on the adapter folder), bypassing
lorafleet entirely: `python direct_vllm.py MODEL REQUEST.json` prints {name: text} as JSON."""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model, request_file = sys.argv[1], sys.argv[2]
    request = json.loads(open(request_file).read())
    llm = LLM(model=model, enable_lora=True, max_lora_rank=16, max_loras=2, max_model_len=512, max_num_seqs=4,
              dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2)
    params = SamplingParams(temperature=0, max_tokens=request["max_tokens"])
    outputs = {}
    for i, (name, path) in enumerate(request["adapters"].items(), start=1):
        lora = LoRARequest(name, i, path) if path else None
        outputs[name] = llm.chat(request["messages"], params, lora_request=lora)[0].outputs[0].text
    print("RESULT " + json.dumps(outputs), flush=True)
    llm.llm_engine.engine_core.shutdown()  # otherwise exit can wait forever on the engine-core process


if __name__ == "__main__":
    main()
