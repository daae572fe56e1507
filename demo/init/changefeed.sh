#!/bin/bash
# Creates the changefeed of $SOURCE's kv.kv into the balancer $BALANCER (which fronts the
# sinks writing to the other cluster), with the token minted by the `keys` service.
# Skipped when a changefeed job already exists, so `docker compose up` can run it again.
set -euo pipefail
: "${SOURCE:?}" "${BALANCER:?}"
url="postgresql://root@${SOURCE}:26257/defaultdb?sslmode=disable"
token="$(cat /keys/kv.jwt)"
existing="$(cockroach sql --url "$url" --format=csv -e \
    "SELECT count(*) FROM [SHOW CHANGEFEED JOBS] WHERE status IN ('running', 'pending', 'paused');" \
    | tail -n 1)"
if [ "$existing" != "0" ]; then
    echo "${SOURCE}: a changefeed exists already"
    exit 0
fi
cockroach sql --url "$url" -e "CREATE CHANGEFEED FOR TABLE kv.kv
  INTO 'webhook-https://${BALANCER}:30004/kv/public?insecure_tls_skip_verify=true'
  WITH diff, updated, resolved = '1s', min_checkpoint_frequency = '1s',
       webhook_sink_config = '{\"Flush\":{\"Bytes\":1048576,\"Frequency\":\"1s\"}}',
       webhook_auth_header = 'Bearer ${token}';"
echo "${SOURCE}: changefeed into ${BALANCER} created"
