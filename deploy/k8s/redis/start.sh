#!/bin/sh
# Start the Redis of a deployment (docker-compose.yml, deploy/k8s): TLS only (no plain TCP port), the ACL users of
# SECURITY.md (this directory's users.acl; `default` off) with their passwords from the environment (an env file
# or a Kubernetes Secret), persistence off and a memory bound.
#   REDIS_GATEWAY_PASSWORD, REDIS_WORKER_PASSWORD, REDIS_ADMIN_PASSWORD   required: 32+ of [A-Za-z0-9_-]
#                                                                      (`openssl rand -hex 32`; they go in URLs)
#   REDIS_TLS_DIR        ca.crt, tls.crt, tls.key (make-tls.sh, or a kubernetes.io/tls Secret)   default /tls
#   REDIS_ACL_FILE       where the ACL file with the passwords is written (owner-only)     default /data/users.acl
#   REDIS_TLS_PORT       default 6379;  REDIS_MAXMEMORY  default 768mb (below the container's memory limit)
set -eu
here=$(dirname "$0")
tls=${REDIS_TLS_DIR:-/tls}
acl=${REDIS_ACL_FILE:-/data/users.acl}
for who in GATEWAY WORKER ADMIN; do
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
# protected-mode no: every client must log in as an ACL user anyway, and in a container Redis listens on all
# interfaces by design.
exec redis-server --port 0 --tls-port "${REDIS_TLS_PORT:-6379}" \
  --tls-cert-file "$tls/tls.crt" --tls-key-file "$tls/tls.key" --tls-ca-cert-file "$tls/ca.crt" \
  --tls-auth-clients optional --aclfile "$acl" --protected-mode no \
  --save "" --appendonly no --maxmemory "${REDIS_MAXMEMORY:-768mb}" --maxmemory-policy noeviction
