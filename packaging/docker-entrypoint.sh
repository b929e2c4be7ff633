#!/bin/sh
# Starts `ludus node` from the container's environment; any arguments are added to it
# (e.g. `docker run ... ludus-node --capacity 8 --quantize int4`). `ludus ...` as the
# first argument runs another ludus command instead (`docker run ... ludus-node ludus --help`).
set -eu
if [ "${1:-}" = "ludus" ]; then shift; exec /usr/local/bin/ludus "$@"; fi
: "${LUDUS_SERVER:?set LUDUS_SERVER to the server's node endpoint, e.g. wss://ludus.example/ws/node}"
: "${LUDUS_DISTRIBUTOR:?set LUDUS_DISTRIBUTOR to the distributor address the server prints}"
: "${LUDUS_MODEL:?set LUDUS_MODEL to a model file or bundle mounted into the container}"
exec /usr/local/bin/ludus --log-format "${LUDUS_LOG_FORMAT:-json}" node \
    --connect "$LUDUS_SERVER" --distributor-address "$LUDUS_DISTRIBUTOR" --model "$LUDUS_MODEL" \
    --key /var/lib/ludus/node.key --receipts /var/lib/ludus/node.receipts --device "${LUDUS_DEVICE:-auto}" "$@"
