#!/bin/sh
# Start one Redis Sentinel of deploy/k8s-redis-sentinel: TLS only (to its clients, the other sentinels and the data
# nodes), clients must give REDIS_SENTINEL_PASSWORD (its requirepass; the sentinels use it among themselves too), and
# it watches the data nodes as their ACL user inferline-sentinel (deploy/k8s/redis/start.sh with REDIS_SENTINEL=yes).
#   REDIS_SENTINEL_PASSWORD  required: 32+ of [A-Za-z0-9_-] (the same Secret key as the data nodes')
#   REDIS_PRIMARY            the first primary's host (a StatefulSet pod's DNS name); REDIS_PRIMARY_PORT default 6379
#   REDIS_MASTER_NAME        what clients ask for (default inferline: the path of REDIS_URL, rediss+sentinel://...)
#   REDIS_QUORUM             sentinels that must agree the primary is down (default 2 of 3)
#   REDIS_DOWN_AFTER_MS      how long a silent primary is down (default 5000)
#   REDIS_TLS_DIR            ca.crt, tls.crt, tls.key (default /tls);  REDIS_SENTINEL_PORT  default 26379
#   REDIS_SENTINEL_DIR       where sentinel.conf lives (default /data): kept across restarts of the container, since
#                            Sentinel writes what it learns (the current primary, the other sentinels) into it
#   REDIS_ANNOUNCE_HOSTNAME  this sentinel's stable DNS name, announced instead of its IP
set -eu
password=${REDIS_SENTINEL_PASSWORD:-}
case "$password" in
  *[!A-Za-z0-9_-]*) echo "sentinel.sh: REDIS_SENTINEL_PASSWORD may hold only letters, digits, - and _" >&2; exit 1 ;;
esac
if [ "${#password}" -lt 32 ]; then
  echo "sentinel.sh: REDIS_SENTINEL_PASSWORD must be set, 32 characters or more (openssl rand -hex 32)" >&2
  exit 1
fi
primary=${REDIS_PRIMARY:?sentinel.sh: REDIS_PRIMARY (the first primary host) must be set}
name=${REDIS_MASTER_NAME:-inferline}
tls=${REDIS_TLS_DIR:-/tls}
dir=${REDIS_SENTINEL_DIR:-/data}
conf="$dir/sentinel.conf"
umask 077
if [ ! -s "$conf" ]; then
  cat > "$conf" <<CONF
port 0
tls-port ${REDIS_SENTINEL_PORT:-26379}
tls-cert-file $tls/tls.crt
tls-key-file $tls/tls.key
tls-ca-cert-file $tls/ca.crt
tls-auth-clients optional
tls-replication yes
dir $dir
requirepass $password
sentinel sentinel-pass $password
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel monitor $name $primary ${REDIS_PRIMARY_PORT:-6379} ${REDIS_QUORUM:-2}
sentinel auth-user $name inferline-sentinel
sentinel auth-pass $name $password
sentinel down-after-milliseconds $name ${REDIS_DOWN_AFTER_MS:-5000}
sentinel failover-timeout $name 60000
CONF
  if [ -n "${REDIS_ANNOUNCE_HOSTNAME:-}" ]; then
    echo "sentinel announce-ip $REDIS_ANNOUNCE_HOSTNAME" >> "$conf"
  fi
fi
exec redis-sentinel "$conf"
