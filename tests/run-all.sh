#!/usr/bin/env bash
# `make test`: lint, types and every test, with the long builds overlapped.
#
# On a bare machine the Go builds (cluster binaries: CPU) and the images (downloads, gzip)
# take about as long as the tests that need neither, and those tests leave CPU idle while
# they wait for the processes they start. So:
#
#   0. First of all, `make cluster-binaries openssl35` (Go and C builds that need no
#      virtualenv: the longest chain of a bare run) starts in the background, in a session of
#      its own, so in a scheduler group of its own (autogroup): while the tests run it gets
#      about one group's share of the CPU, as each federation a test starts does (its
#      processes run in sessions of their own). At nice 19 (PQFED_BUILD_NICE=19) it got only
#      what the tests left: a bare run then waited ~30 min for the build after the tests.
#   1. The tests' prerequisites (the virtualenv, liboqs for both architectures, the X-Wing
#      vectors, the Go interop peer), then `make images` in the background the same way.
#      When everything is built already, both end in seconds.
#   2. Meanwhile: lint and types, then every test that needs none of it (`-m "not cluster
#      and not images and not openssl35"`), at normal priority, in PQFED_TEST_WORKERS
#      (default 2) pytest-xdist workers: the `slow` ones (whole federations) one after
#      another in one worker, everything else in the other (tests/conftest.py).
#   3. When the builds are done: the tests on the real node (`real_node`: one private cluster
#      with kubelet + containerd, mostly waiting for image imports and containers) beside
#      every other cluster and image test. Each cluster is private (own state dir, ports,
#      bridges, subnets), so the two pytest processes do not meet. In a bare run the real
#      node's 14 tests took 20 min and the other 175 32 min. A third process (those 175 in
#      two workers) overloaded the two cores (load 17-21): the real node's docs quickstart
#      then ran past its 600 s timeout.
#
# Logs: results/test-logs/{build,images,real-node}.log (printed here when they matter).
# PQFED_TEST_SERIAL=1: build first, then one plain pytest run (the order of earlier days).
# Extra pytest arguments: PYTEST_ARGS="...".
set -uo pipefail
cd "$(dirname "$0")/.."

BIN="${VENV:-.venv}/bin"
LOGS=results/test-logs
PREREQS=(venv liboqs liboqs-arm64 vectors interop)
mkdir -p "$LOGS"
read -r -a EXTRA <<<"${PYTEST_ARGS:-}"
start=$SECONDS

say() { printf '[make test %4ds] %s\n' "$((SECONDS - start))" "$*"; }

if [[ "${PQFED_TEST_SERIAL:-0}" == 1 ]]; then
    make "${PREREQS[@]}" lint cluster-binaries images openssl35 || exit 1
    exec "$BIN/python" -m pytest -q "${EXTRA[@]}"
fi

# A make run in the background, in its own session (so its own autogroup), logging to $1.
NICE="${PQFED_BUILD_NICE:-0}"
builds=()
build_logs=()
background() {
    local log="$1"; shift
    setsid -w bash -c 'echo "$0" > /proc/self/autogroup 2>/dev/null; exec nice -n "$0" make "$@"' \
        "$NICE" "$@" >"$LOGS/$log" 2>&1 &
    builds+=("$!")
    build_logs+=("$log")
}
stop_builds() { for pid in "${builds[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done; }
trap stop_builds EXIT INT TERM

# 0. The Go and C builds, before anything else.
say "building the cluster binaries and OpenSSL 3.5 in the background ($LOGS/build.log)"
background build.log -j2 cluster-binaries openssl35

# 1. The tests' prerequisites, then the images in the background.
make "${PREREQS[@]}" || { say "the prerequisites failed"; exit 1; }
say "building the images in the background ($LOGS/images.log)"
background images.log images

# 2. Lint, types, and the tests that need no build.
make lint || { say "lint failed"; exit 1; }
say "tests that need no cluster and no image"
"$BIN/python" -m pytest -q --durations=15 -n "${PQFED_TEST_WORKERS:-2}" --dist loadgroup \
    -m "not cluster and not images and not openssl35" "${EXTRA[@]}"
unit=$?
say "those tests: exit $unit"

say "waiting for the builds"
failed=0
for i in "${!builds[@]}"; do
    wait "${builds[$i]}" && continue
    say "a build failed; the end of $LOGS/${build_logs[$i]}:"
    tail -n 60 "$LOGS/${build_logs[$i]}"
    failed=1
done
trap - EXIT INT TERM
[[ $failed == 0 ]] || exit 1
say "builds done"

# 3. The real node's tests beside the other cluster and image tests.
say "real-node tests in the background ($LOGS/real-node.log); the other cluster and image tests here"
"$BIN/python" -m pytest -q --durations=15 -m "real_node" "${EXTRA[@]}" >"$LOGS/real-node.log" 2>&1 &
real=$!
"$BIN/python" -m pytest -q --durations=15 \
    -m "(cluster or images or openssl35) and not real_node" "${EXTRA[@]}"
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
