"""Development tooling, never imported by a production gateway.

- `demo`          the demo on the embedded defaults (`make demo`)
- `local_server`  `lorafleet serve` as a child process on loopback, used by the demo, the
                  benchmarks and the tests
"""
