#!/bin/sh
# A private CA and a server certificate for the deployment's Redis, into DIR (ca.crt, tls.crt, tls.key: the names of
# a kubernetes.io/tls Secret). Does nothing when DIR already has them (bring your own: put them there). The CA's
# key is discarded: to renew, delete DIR's files and run again (then restart Redis and its clients).
#   sh make-tls.sh DIR [EXTRA_DNS_NAME...]
# Kubernetes:  sh deploy/k8s/redis/make-tls.sh tls && kubectl -n inferline create secret generic \
#                inferline-redis-tls --from-file=tls/ca.crt --from-file=tls/tls.crt --from-file=tls/tls.key
set -eu
dir=${1:?usage: make-tls.sh DIR [EXTRA_DNS_NAME...]}
shift
mkdir -p "$dir"
if [ -s "$dir/ca.crt" ] && [ -s "$dir/tls.crt" ] && [ -s "$dir/tls.key" ]; then
  echo "make-tls.sh: $dir already has a certificate; keeping it"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
san="DNS:redis,DNS:redis.inferline.svc,DNS:redis.inferline.svc.cluster.local,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do san="$san,DNS:$name"; done
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$work/ext"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/ca.key" -out "$work/ca.crt" -days 825 \
  -subj "/CN=inferline redis CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$work/tls.key" -out "$work/tls.csr" -subj "/CN=redis" 2>/dev/null
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
  -out "$work/tls.crt" -days 825 -extfile "$work/ext" 2>/dev/null
cp "$work/ca.crt" "$work/tls.crt" "$dir/"
( umask 077; cp "$work/tls.key" "$dir/tls.key" )
chmod 644 "$dir/ca.crt" "$dir/tls.crt"
if [ "$(id -u)" = 0 ]; then
  chown "${REDIS_UID:-999}" "$dir/tls.key"   # the redis user of the redis image reads it; nobody else
fi
echo "make-tls.sh: wrote $dir/ca.crt, $dir/tls.crt, $dir/tls.key"
