#!/usr/bin/env bash
# What the tests run beside the engine, from the OS (installed with apt where missing, then started):
# - Redis: several gateways sharing rate counters;
# - PostgreSQL: every catalog-level test runs on it as well as on SQLite, with a role that may create databases
#   (LORAFLEET_TEST_POSTGRES_URL's default: postgresql+psycopg://lorafleet:lorafleet@127.0.0.1:5432/postgres);
# - Chromium: the console's browser tests drive Debian's build headless (Playwright never downloads one).
# Idempotent: a second run finds everything in place.
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

apt_install() {
  echo "installing $* (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

command -v redis-server >/dev/null || apt_install redis-server
command -v pg_lsclusters >/dev/null || apt_install postgresql
command -v chromium >/dev/null || apt_install chromium

# The first cluster (Debian's package makes one, "main"); start it if it is down.
read -r version cluster status < <(pg_lsclusters -h | awk '{print $1, $2, $4; exit}') || true
if [ -z "${version:-}" ]; then
  echo "no PostgreSQL cluster: create one with pg_createcluster" >&2
  exit 1
fi
[ "$status" = online ] || $SUDO pg_ctlcluster "$version" "$cluster" start

as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
for attempt in $(seq 50); do as_postgres pg_isready -q && break; sleep 0.2; done
as_postgres psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'lorafleet'" | grep -q 1 ||
  as_postgres psql -qc "CREATE ROLE lorafleet LOGIN PASSWORD 'lorafleet' CREATEDB"
