"""Drift monitoring of every live adapter version.

- `statistics`  pure: request features, reservoir sampling, KS / MMD tests, alpha spending,
                Benjamini-Hochberg
- `monitor`     `DriftMonitor`: live sampling, scheduled validation replay against baselines,
                drift looks
- `report`      the self-contained HTML report (`lorafleet drift report`)
- `timeline`    the feedback timeline of live versions (catalog aggregates), shown in the drift
                status
- `schemas`     the API schemas this package builds (`FeedbackTimeline`)
"""
