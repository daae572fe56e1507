#!/bin/bash
# A throwaway CA and a certificate for both balancers, concatenated as HAProxy wants it.
# Demo only: the changefeeds skip verification (insecure_tls_skip_verify=true).
set -euo pipefail
cd /certs
if [ -s lb.pem ]; then
    echo "certificate exists"
    exit 0
fi
cockroach cert create-ca --certs-dir=/certs --ca-key=/certs/ca.key
# The changefeeds skip verification, so the names matter little; underscores are not valid
# DNS names, hence localhost only.
cockroach cert create-node localhost --certs-dir=/certs --ca-key=/certs/ca.key
cat node.crt node.key > lb.pem
# HAProxy runs as an unprivileged user in its image.
chmod 0644 lb.pem
