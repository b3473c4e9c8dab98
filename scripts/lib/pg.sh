#!/usr/bin/env bash
# Throwaway PostgreSQL 15 clusters for scripts: source this file, then `pg_start DIR` / `pg_stop DIR`.
# Layout: DIR/data (cluster), DIR/pg.log (server log), unix socket in DIR.

PG_BIN=/usr/lib/postgresql/15/bin
export PATH="$PG_BIN:$PATH"

# Run a PostgreSQL server binary; initdb/postgres refuse to run as root.
_pg_as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

_pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pg_start DIR: init (unless DIR/data holds one already) and start a cluster in DIR; exports
# PGHOST, PGPORT, PGUSER, DATABASE_URL.
pg_start() {
    local dir=${1:?usage: pg_start DIR} port
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$dir" && chmod 700 "$dir" || return 1
    fi
    port=$(_pg_free_port) || return 1
    if [ ! -f "$dir/data/PG_VERSION" ] && ! _pg_as_owner initdb -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync \
        >"$dir/initdb.log" 2>&1; then
        echo "pg_start: initdb failed:" >&2
        tail -n 20 "$dir/initdb.log" >&2
        return 1
    fi
    if ! _pg_as_owner pg_ctl -D "$dir/data" -w -t 30 -l "$dir/pg.log" \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c shared_preload_libraries=pg_stat_statements -c max_locks_per_transaction=1024 -c max_connections=200" \
        start >/dev/null; then
        echo "pg_start: server failed to start:" >&2
        tail -n 20 "$dir/pg.log" >&2
        return 1
    fi
    export PGPORT=$port PGHOST=127.0.0.1 PGUSER=postgres
    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

# pg_halt DIR: stop the cluster, keep DIR (pg_start starts it again). Safe to call twice.
pg_halt() {
    local dir=${1:?usage: pg_halt DIR}
    if [ -f "$dir/data/postmaster.pid" ]; then
        _pg_as_owner pg_ctl -D "$dir/data" -m fast -t 30 stop >/dev/null 2>&1 ||
            _pg_as_owner pg_ctl -D "$dir/data" -m immediate -t 30 stop >/dev/null 2>&1 || true
    fi
}

# pg_stop DIR: stop the cluster and remove DIR. Safe to call twice. A fast shutdown that has
# not finished after 30 s (a backend that does not reach an interrupt check) becomes an
# immediate one, so that no server is left running on a removed directory.
pg_stop() {
    local dir=${1:?usage: pg_stop DIR}
    [ -d "$dir" ] || return 0
    pg_halt "$dir"
    rm -rf "$dir"
}
