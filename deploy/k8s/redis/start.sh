#!/bin/sh
# Start the Redis of a deployment (docker-compose.yml, deploy/k8s): TLS only (no plain TCP port), the ACL users of
# SECURITY.md (this directory's users.acl; `default` off) with their passwords from the environment (an env file
# or a Kubernetes Secret), persistence off and a memory bound.
#   REDIS_GATEWAY_PASSWORD, REDIS_WORKER_PASSWORD, REDIS_ADMIN_PASSWORD   required: 32+ of [A-Za-z0-9_-]
#                                                                      (`openssl rand -hex 32`; they go in URLs)
#   REDIS_TLS_DIR        ca.crt, tls.crt, tls.key (make-tls.sh, or a kubernetes.io/tls Secret)   default /tls
#   REDIS_ACL_FILE       where the ACL file with the passwords is written (owner-only)     default /data/users.acl
#   REDIS_TLS_PORT       default 6379;  REDIS_MAXMEMORY  default 768mb (below the container's memory limit)
#   REDIS_CLUSTER=yes    a Redis Cluster node (deploy/k8s-redis-cluster): TLS on the cluster bus and for
#                        replication too, nodes.conf in REDIS_CLUSTER_DIR (default /data, keep it on a volume), and one
#                        more ACL user, inferline-cluster (REDIS_CLUSTER_PASSWORD, 32+ characters), that replicas and
#                        the create job log in as: cluster and replication commands only, no key.
#   REDIS_ANNOUNCE_HOSTNAME  the node's stable DNS name (a StatefulSet pod's), announced instead of its IP
#   REDIS_SENTINEL=yes   a data node watched by Redis Sentinel (deploy/k8s-redis-sentinel): replication over TLS, and
#                        one more ACL user, inferline-sentinel (REDIS_SENTINEL_PASSWORD, 32+ characters), that the
#                        sentinels monitor and reconfigure the nodes as and replicas log in to their primary as (the
#                        commands Redis's Sentinel documentation lists for it, and replication's; no key). With
#                        REDIS_REPLICA_OF=HOST the node starts as a replica of HOST (same port); the sentinels move
#                        it after a failover.
set -eu
here=$(dirname "$0")
tls=${REDIS_TLS_DIR:-/tls}
acl=${REDIS_ACL_FILE:-/data/users.acl}
who_all="GATEWAY WORKER ADMIN"
[ "${REDIS_CLUSTER:-}" = yes ] && who_all="$who_all CLUSTER"
[ "${REDIS_SENTINEL:-}" = yes ] && who_all="$who_all SENTINEL"
for who in $who_all; do
  eval "password=\${REDIS_${who}_PASSWORD:-}"
  case "$password" in
    *[!A-Za-z0-9_-]*) echo "start.sh: REDIS_${who}_PASSWORD may hold only letters, digits, - and _" >&2; exit 1 ;;
  esac
  if [ "${#password}" -lt 32 ]; then
    echo "start.sh: REDIS_${who}_PASSWORD must be set, 32 characters or more (openssl rand -hex 32)" >&2
    exit 1
  fi
done
umask 077
sed -e "s/>GATEWAY_PASSWORD />${REDIS_GATEWAY_PASSWORD} /" -e "s/>WORKER_PASSWORD />${REDIS_WORKER_PASSWORD} /" \
    -e "s/>ADMIN_PASSWORD />${REDIS_ADMIN_PASSWORD} /" "$here/users.acl" > "$acl"
cluster=""
if [ "${REDIS_CLUSTER:-}" = yes ]; then
  echo "user inferline-cluster on >${REDIS_CLUSTER_PASSWORD} resetkeys resetchannels -@all +ping +auth +hello +info +cluster +psync +sync +replconf +readonly +config|get" >> "$acl"
  data=${REDIS_CLUSTER_DIR:-/data}
  cluster="--cluster-enabled yes --cluster-config-file $data/nodes.conf --cluster-node-timeout 5000 --tls-cluster yes
    --tls-replication yes --masteruser inferline-cluster --masterauth ${REDIS_CLUSTER_PASSWORD} --dir $data"
  if [ -n "${REDIS_ANNOUNCE_HOSTNAME:-}" ]; then
    cluster="$cluster --cluster-announce-hostname $REDIS_ANNOUNCE_HOSTNAME --cluster-preferred-endpoint-type hostname"
  fi
fi
if [ "${REDIS_SENTINEL:-}" = yes ]; then
  echo "user inferline-sentinel on >${REDIS_SENTINEL_PASSWORD} resetkeys allchannels -@all +ping +auth +hello +info +role +multi +exec +slaveof +replicaof +config|rewrite +config|get +publish +subscribe +client|setname +client|kill +script|kill +psync +sync +replconf" >> "$acl"
  cluster="--tls-replication yes --masteruser inferline-sentinel --masterauth ${REDIS_SENTINEL_PASSWORD}"
  if [ -n "${REDIS_ANNOUNCE_HOSTNAME:-}" ]; then
    cluster="$cluster --replica-announce-ip $REDIS_ANNOUNCE_HOSTNAME"
  fi
  if [ -n "${REDIS_REPLICA_OF:-}" ]; then
    cluster="$cluster --replicaof $REDIS_REPLICA_OF ${REDIS_TLS_PORT:-6379}"
  fi
fi
# protected-mode no: every client must log in as an ACL user anyway, and in a container Redis listens on all
# interfaces by design.
exec redis-server --port 0 --tls-port "${REDIS_TLS_PORT:-6379}" \
  --tls-cert-file "$tls/tls.crt" --tls-key-file "$tls/tls.key" --tls-ca-cert-file "$tls/ca.crt" \
  --tls-auth-clients optional --aclfile "$acl" --protected-mode no \
  --save "" --appendonly no --maxmemory "${REDIS_MAXMEMORY:-768mb}" --maxmemory-policy noeviction $cluster
