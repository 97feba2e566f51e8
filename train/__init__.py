"""Everything offline.

- `trainer`    LoRA training of the language model, top to bottom (`train`); `config` its
               `TrainConfig`; `result` what a run produced (`TrainResult`), torch-free
- `data`       examples rendered by the base's own processor (`encode`, `collate`)
- `compare`    baseline-first evaluation: base and adapter side by side through vLLM
               (`compare_to_base`)
- `servable`   the proof that an adapter loads in vLLM and changes its outputs; `pipeline`
               evaluation + proof + manifest after a run; `vllm_generate` greedy vLLM generations in
               a child process
- `quantize`   int4 / int8 / w4a16 checkpoints vLLM serves as they are
- `tiny_model`, `shapes`, `random_adapter`   the tiny local Qwen2.5-VL, its shapes world, seeded
                                             adapters
- `real_size_base`   a base of a released VLM's architecture and size with random weights, for
                     measuring lorafleet at real size
"""
