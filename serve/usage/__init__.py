"""Usage and budgets: what each tenant's requests used and cost, and what it may spend.

- `prices`   the prices (settings, per-tenant overrides) and a request's cost, in one place
- `periods`  a budget as set, and its periods in UTC (a day, a calendar month)
- `ledger`   each gateway's usage summed in memory per day and written every flush period
- `records`  the catalog's side: usage upserts, a period's spending, grouped sums, budgets
- `budgets`  budgets enforced across gateways (shared counters), their alerts, once per period
- `report`   the usage report's rows, totals and CSV
- `schemas`  the API schemas this package builds (report, prices, budgets)
"""
