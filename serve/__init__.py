"""The gateway and everything at request time: OpenAI API, registry API, engine supervisor, metrics, CLI."""
