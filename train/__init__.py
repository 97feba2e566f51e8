"""Everything offline: data pipeline, LoRA trainer, baseline-first evaluation, servability proof, and the
tiny shapes world used by the demo and the tests."""
