#!/usr/bin/env bash
# The relay's user-space instructions per resumed reconnect, counted by valgrind (cachegrind,
# no cache simulation) in a reconnect storm: a figure that, unlike CPU time on a shared machine,
# repeats to within 0.1 % from run to run, so that a change worth 1 % can be seen at all.
#
# Each build runs the storm at two sizes; the restarted relay's count at each size is startup +
# reconnects + stop, and the difference between the sizes divided by the devices added is what
# one reconnect costs. Devices resume their MQTT sessions where the relay keeps them (the storm's
# default); set STORM_ARGS=--clean-sessions to have every device subscribe again. Kernel time
# (system calls, TCP) is not in it, and valgrind's CPU is not the real one: it has no RDRAND
# (aws-lc's generator falls back to jitter entropy at each key pair, about a third of the count)
# and no SHA or AVX-512 instructions (X25519 and SHA-256 run their generic code). Compare builds
# with it; the absolute figure is not a CPU cost.
#
#   bench/storm-instructions.sh NAME=BROKER [NAME=BROKER ...]
#   SIZES="1000 2000" bench/storm-instructions.sh before=/tmp/broker-old after=target/release/broker
#
# Prints one JSON object per build and size, then one per build with `instructions_per_reconnect`.
set -euo pipefail

BENCH=${BENCH:-target/release/bench}
SIZES=${SIZES:-"1000 2000"}
[ $# -gt 0 ] || { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
[ -x "$BENCH" ] || { echo "no $BENCH: cargo build --release -p bench (or set BENCH=)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for spec in "$@"; do
    name=${spec%%=*}
    broker=$(realpath "${spec#*=}")
    wrapper="$work/$name.sh"
    printf '#!/bin/sh\nexec valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=%s/%s.%%p %s "$@"\n' \
        "$work" "$name" "$broker" > "$wrapper"
    chmod +x "$wrapper"
    counts=()
    for devices in $SIZES; do
        rm -f "$work/$name".[0-9]*
        # shellcheck disable=SC2086 # STORM_ARGS is a list of flags
        "$BENCH" reconnect-storm --devices "$devices" --concurrency 100 ${STORM_ARGS:-} \
            --targets "chukei@$name=$wrapper" > "$work/out.json" 2> "$work/err.txt" ||
            { cat "$work/err.txt" >&2; exit 1; }
        # The relay started second is the restarted one: the storm.
        restarted=$(ls -tr "$work/$name".[0-9]* | sed -n 2p)
        ir=$(awk '/^summary:/ {print $2}' "$restarted")
        counts+=("$devices:$ir")
        echo "{\"build\":\"$name\",\"devices\":$devices,\"restarted_relay_instructions\":$ir}"
    done
    first=${counts[0]}; last=${counts[${#counts[@]}-1]}
    awk -v a="$first" -v b="$last" -v n="$name" 'BEGIN {
        split(a, x, ":"); split(b, y, ":");
        printf "{\"build\":\"%s\",\"instructions_per_reconnect\":%d}\n", n, (y[2] - x[2]) / (y[1] - x[1]) }'
done
