#!/bin/sh
# One signing key for the demo and a token for kv.public; the public half is installed on both
# clusters by the *_auth services. Kept across runs (the `keys` volume).
set -eu
cd /keys
if [ ! -s sink.pem ]; then
    cdc-sink make-jwt --generate-key -k sink.pem > install-key.sql
fi
if [ ! -s kv.jwt ]; then
    cdc-sink make-jwt -k sink.pem -a kv.public -o kv.jwt
fi
# Demo volume: the changefeed jobs read the token whatever user their image runs as.
chmod 0644 kv.jwt sink.pub.pem
echo "keys ready"
