"""Traffic control of a deployment: canary rollouts and A/B tests.

- `routing`     sticky, monotone assignment of a request to a variant (`bucket_of`, `choose`)
- `phases`      the phases of a rollout and of an A/B test (`Phase`, `ACTIVE`, `SERVING`)
- `state`       the state machine: commands (start, pause, abort, ...), `plan_tick`, decisions
                (`Transition`), `active_rollout`
- `statistics`  pure decision statistics (`assess_step`, `paired_gate`, `compare_variants`)
- `gate`        the validation gate: both versions answer the validation set, paired
                non-inferiority
- `reconciler`  `RolloutController`: one reconcile per active rollout per tick, under a lease
- `series`      a rollout's per-variant, per-period samples and feedback (`GET .../rollout/series`)
- `schemas`     the API schemas this package builds (`RolloutSeries`)
"""
