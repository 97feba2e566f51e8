"""The catalog's Alembic migrations: `env.py`, and one file per schema revision in `versions/`.

Run through `lorafleet.adapters.migrate` (configured in code, no alembic.ini). A new revision, from
a checkout: `.venv/bin/alembic -c adapters/migrations/alembic.ini revision --autogenerate -m "what
changed"` (against a scratch catalog at head), then review it: autogenerate is a draft.
"""
