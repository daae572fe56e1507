#!/bin/bash
# Prepares one cluster ($REGION): rangefeeds, an optional license, the staging database, the
# replicated kv.kv table with its hidden _source/_timestamp columns, and the DLQ table.
# Idempotent: `docker compose up` may run it again.
set -euo pipefail
: "${REGION:?REGION must be east or west}"
url="postgresql://root@${REGION}:26257/defaultdb?sslmode=disable"
sql() { cockroach sql --url "$url" "$@"; }

sql -e "SET CLUSTER SETTING kv.rangefeed.enabled = true;"
# Recent versions run changefeeds without a license; apply one only when it is given.
if [ -n "${COCKROACH_DEV_LICENSE:-}" ]; then
    sql -e "SET CLUSTER SETTING cluster.organization = '${COCKROACH_DEV_ORGANIZATION:-}';"
    sql -e "SET CLUSTER SETTING enterprise.license = '${COCKROACH_DEV_LICENSE}';"
fi
sql -e "CREATE DATABASE IF NOT EXISTS _cdc_sink;"
# The kv workload's table, with the two hidden columns the userscript relies on. On a table
# that already exists, the seed's ALTER TABLE ... ADD COLUMN does the same.
sql -e "CREATE DATABASE IF NOT EXISTS kv;"
sql -e "CREATE TABLE IF NOT EXISTS kv.kv (
    k INT8 NOT NULL PRIMARY KEY,
    v BYTES NOT NULL,
    _source STRING NOT VISIBLE DEFAULT '${REGION}' ON UPDATE '${REGION}',
    _timestamp TIMESTAMPTZ NOT VISIBLE DEFAULT now() + '1s' ON UPDATE now() + '1s'
);"
sql -e "CREATE TABLE IF NOT EXISTS kv.cdc_sink_dlq (
    event UUID DEFAULT gen_random_uuid() PRIMARY KEY,
    dlq_name TEXT NOT NULL,
    source_nanos INT8 NOT NULL,
    source_logical INT8 NOT NULL,
    data_after JSONB NOT NULL,
    data_before JSONB NOT NULL
);"
echo "${REGION}: ready"
