"""Development tooling, never imported by a production gateway: the demo (`demo`) and `lorafleet
serve` as a child process on loopback (`local_server`), used by the demo, the benchmarks and the
tests."""
