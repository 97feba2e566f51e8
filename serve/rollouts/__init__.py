"""Traffic control of a deployment: canary rollouts and A/B tests.

- `routing`     sticky, monotone assignment of a request to a variant (`bucket_of`, `choose`)
- `state`       the state machine: phases, commands (start, pause, abort, ...), `plan_tick`,
                `active_rollout`
- `statistics`  pure decision statistics (`assess_step`, `paired_gate`, `compare_variants`)
- `gate`        the validation gate: both versions answer the validation set, paired non-inferiority
- `reconciler`  `RolloutController`: one reconcile per active rollout per tick, under a lease
- `series`      a rollout's per-variant, per-period samples and feedback (`GET .../rollout/series`)
"""
