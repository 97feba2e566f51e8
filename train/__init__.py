"""Everything offline: the tiny model factory and adapters for the demo and tests (the trainer comes next)."""
