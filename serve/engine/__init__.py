"""The engine: one vLLM OpenAI server on a private loopback port.

- `client`      the gateway's side: `EngineClient` (private HTTP clients, registered adapters,
                `ensure_loaded`, `preload`), the unavailable-engine policy and its errors
                (`EngineUnavailable`, `AdapterLoadFailed`)
- `residency`   `Residency`: which registered adapters are in the engine's memory and GPU slots (a
                model of vLLM's two LRU caches, fed with what the gateway sends)
- `supervisor`  `EngineSupervisor`: starts, health-checks and restarts the process (and its whole
                group), or follows an engine it did not start (`engine_url`)
- `command`     `engine_command`: the vLLM command line and environment; `engine_process_options`:
                its placement
- `sizing`      `derive_sizing`: max LoRA rank, adapter slots, batch and KV cache from the machine
                and the catalog
- `hardware`    `detect_hardware`, `plan_quantization`: what this machine can serve, refused before
                any start
- `resolver`    vLLM's plugin on an engine node: loads an adapter by digest from the store the
                first time a request names it, and publishes what the node is
- `vllm_fixes`  vLLM's plugin in every engine: lorafleet's fixes to vLLM's adapter lookup and to its
                adapter metric's series
- `loaded_adapters`  an engine node's adapter residency on its /metrics, in vLLM's proposed series
                (`vllm:lora_adapter_loaded`), for an InferencePool's endpoint picker
"""
