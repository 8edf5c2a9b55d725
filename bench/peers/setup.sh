#!/usr/bin/env bash
# Installs what bench/peers/ needs to compare plan_day with two peers; idempotent.
#
#   bash bench/peers/setup.sh
#
# System (Debian, as root): postgresql (for DBOS) and redis-server (for Celery); the peer
# scripts start throwaway servers of their own, so the distribution's services are stopped.
# Python, into the project's .venv (not in pyproject.toml: only these benchmarks use them):
#   dbos              DBOS Transact for Python (brings SQLAlchemy and psycopg)
#   psycopg[binary]   the libpq driver DBOS uses, without a system libpq build
#   celery[redis]     Celery with the Redis broker and result backend (redis-py)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${VENV:-$root/.venv}"

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if ((${#need[@]})); then
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The packages start system-wide servers; the benchmarks start their own.
    for service in postgresql redis-server; do
        "${sudo[@]}" service "$service" stop >/dev/null 2>&1 || true
    done
fi

"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    dbos 'psycopg[binary]' 'celery[redis]'
