#!/usr/bin/env bash
# `make test`: lint, types and every test, with the long builds overlapped.
#
# On a bare machine the Go builds (cluster binaries: CPU) and the images (downloads, gzip)
# take about as long as the tests that need neither, and those tests leave CPU idle while
# they wait for the processes they start. So:
#
#   1. `make cluster-binaries images openssl35` starts in the background at the lowest priority, in a
#      scheduler group of its own (autogroup nice 19): it takes only what the tests leave.
#      When everything is built already it ends in seconds.
#   2. Meanwhile: lint and types, then every test that needs none of it (`-m "not cluster
#      and not images and not openssl35"`), at normal priority, in PQFED_TEST_WORKERS
#      (default 2) pytest-xdist workers: the `slow` ones (whole federations) one after
#      another in one worker, everything else in the other (tests/conftest.py).
#   3. When the build is done: the tests on the real node (`real_node`: one private cluster
#      with kubelet + containerd, mostly waiting for image imports and containers) beside
#      every other cluster and image test. Each of those tests runs its own cluster (own
#      state dir, ports, bridges, subnets), so the two pytest processes do not meet.
#
# Logs: results/test-logs/{build,real-node}.log (printed here when they matter).
# PQFED_TEST_SERIAL=1: build first, then one plain pytest run (the order of earlier days).
# Extra pytest arguments: PYTEST_ARGS="...".
set -uo pipefail
cd "$(dirname "$0")/.."

BIN="${VENV:-.venv}/bin"
LOGS=results/test-logs
mkdir -p "$LOGS"
read -r -a EXTRA <<<"${PYTEST_ARGS:-}"
start=$SECONDS

say() { printf '[make test %4ds] %s\n' "$((SECONDS - start))" "$*"; }

if [[ "${PQFED_TEST_SERIAL:-0}" == 1 ]]; then
    make lint cluster-binaries images openssl35 || exit 1
    exec "$BIN/python" -m pytest -q "${EXTRA[@]}"
fi

# 1. The build, in its own session (so its own autogroup) at nice 19.
say "building the cluster binaries, images and OpenSSL 3.5 in the background ($LOGS/build.log)"
# -j3: the three targets are independent and each starts at once. With -j2 the images (mostly
# downloads, dpkg and gzip) waited for a slot until OpenSSL 3.5 was built, ~20 min at nice 19.
setsid -w bash -c 'echo 19 > /proc/self/autogroup 2>/dev/null; exec nice -n 19 make -j3 cluster-binaries images openssl35' \
    >"$LOGS/build.log" 2>&1 &
build=$!
stop_build() { kill -TERM -- "-$build" 2>/dev/null; }
trap stop_build EXIT INT TERM

# 2. Lint, types, and the tests that need no build.
make lint || { say "lint failed"; exit 1; }
say "tests that need no cluster and no image"
"$BIN/python" -m pytest -q -n "${PQFED_TEST_WORKERS:-2}" --dist loadgroup \
    -m "not cluster and not images and not openssl35" "${EXTRA[@]}"
unit=$?
say "those tests: exit $unit"

say "waiting for the build"
wait "$build"
built=$?
trap - EXIT INT TERM
if [[ $built -ne 0 ]]; then
    say "the build failed; the end of $LOGS/build.log:"
    tail -n 60 "$LOGS/build.log"
    exit 1
fi
say "build done"

# 3. The real node's tests beside the other cluster and image tests.
say "real-node tests in the background ($LOGS/real-node.log); the other cluster and image tests here"
"$BIN/python" -m pytest -q -m "real_node" "${EXTRA[@]}" >"$LOGS/real-node.log" 2>&1 &
real=$!
"$BIN/python" -m pytest -q -m "(cluster or images or openssl35) and not real_node" "${EXTRA[@]}"
cluster=$?
wait "$real"
realrc=$?
say "real-node tests (exit $realrc):"
cat "$LOGS/real-node.log"

# pytest exits 5 when a selection is empty (a checkout without such tests): not a failure.
status=0
for rc in "$unit" "$cluster" "$realrc"; do
    [[ "$rc" == 0 || "$rc" == 5 ]] || status=1
done
say "done: tests without build exit $unit, cluster/image tests exit $cluster, real node exit $realrc"
exit "$status"
