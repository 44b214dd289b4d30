#!/usr/bin/env bash
# A throw-away PostgreSQL server for `evomerge worker` tests and local multi-process runs.
#
#   scripts/postgres.sh start DIR    initialise a cluster in DIR (once), start it on 127.0.0.1 (once), create the
#                                    database `evomerge`, print its URL:
#                                    postgresql://evomerge:PASSWORD@127.0.0.1:PORT/evomerge
#   scripts/postgres.sh stop DIR     stop the server of DIR (no-op when it is not running)
#   scripts/postgres.sh bindir       print the server's bin dir; exit 3 when no server is installed
#   scripts/postgres.sh install      install the Debian package `postgresql` when no server is found (root + apt)
#
# Start and stop are idempotent: a second `start DIR` prints the same URL. The cluster is for tests, not data:
# fsync is off. Access is by password (scram-sha-256), kept in DIR/password. As root the server runs as the
# `postgres` user (initdb refuses root), so DIR must be reachable by it, e.g. a directory under /tmp.
# PG_BINDIR overrides where the server binaries are looked up (default: pg_ctl on PATH, else the newest
# /usr/lib/postgresql/<version>/bin).
set -euo pipefail

DB=evomerge
USER_NAME=evomerge

die() { echo "postgres.sh: $1" >&2; exit "${2:-1}"; }

bindir() {
  local ctl dir
  if [ -n "${PG_BINDIR:-}" ]; then
    [ -x "$PG_BINDIR/pg_ctl" ] && { echo "$PG_BINDIR"; return 0; }
    return 3
  fi
  if ctl="$(command -v pg_ctl 2>/dev/null)"; then
    dir="$(dirname "$(readlink -f "$ctl")")"
    [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && { echo "$dir"; return 0; }
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/pg_ctl" ] && [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  return 3
}

# Run a server command as the cluster's owner: `postgres` when we are root, else ourselves.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  local dir="$1" bin port password
  bin="$(bindir)" || die "no PostgreSQL server found (pg_ctl on PATH or /usr/lib/postgresql/*/bin);\
 install it with 'apt-get install postgresql' or set PG_BINDIR" 3
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' user (created by the postgresql package)"
    chown postgres: "$dir"
    as_owner test -w "$dir" ||
      die "$dir is not reachable by the postgres user (a parent directory is private); use a directory under /tmp"
  fi
  chmod 700 "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    rm -rf "$dir/data"
    free_port >"$dir/port"
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$dir/password"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir/port" "$dir/password"
    chmod 600 "$dir/password"
    as_owner "$bin/initdb" -D "$dir/data" -U "$USER_NAME" --pwfile="$dir/password" -A scram-sha-256 -E UTF8 \
      --no-locale --no-sync >"$dir/initdb.log" 2>&1 || die "initdb failed, see $dir/initdb.log"
  fi
  port="$(cat "$dir/port")"
  password="$(cat "$dir/password")"
  if ! as_owner "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1; then
    local options="-c port=$port -c listen_addresses=127.0.0.1 -c unix_socket_directories='$dir'"
    options+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"  # throw-away data: speed over safety
    as_owner "$bin/pg_ctl" start -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$options" >/dev/null ||
      die "the server did not start, see $dir/server.log"
  fi
  export PGPASSWORD="$password"
  local exists
  exists="$("$bin/psql" -h 127.0.0.1 -p "$port" -U "$USER_NAME" -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$DB'")"
  if [ -z "$exists" ]; then
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$USER_NAME" "$DB"
  fi
  echo "postgresql://$USER_NAME:$password@127.0.0.1:$port/$DB"
}

stop() {
  local dir="$1" bin
  [ -f "$dir/data/PG_VERSION" ] || return 0
  bin="$(bindir)" || die "no PostgreSQL server found to stop $dir" 3
  if as_owner "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" stop -D "$dir/data" -m fast -w >/dev/null
  fi
}

install() {
  bindir >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "no PostgreSQL server, and installing one needs root" 3
  command -v apt-get >/dev/null || die "no PostgreSQL server, and no apt-get to install one" 3
  # the package would create and start a default cluster; the tests make their own
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/evomerge.conf
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  bindir >/dev/null || die "the postgresql package is installed but no server binary was found" 3
}

case "${1:-}" in
  start) [ $# = 2 ] || die "usage: $0 start DIR" 2; start "$2" ;;
  stop) [ $# = 2 ] || die "usage: $0 stop DIR" 2; stop "$2" ;;
  bindir) bindir || die "no PostgreSQL server found (pg_ctl on PATH or /usr/lib/postgresql/*/bin)" 3 ;;
  install) install ;;
  *) die "usage: $0 start DIR | stop DIR | bindir | install" 2 ;;
esac
