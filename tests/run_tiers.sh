#!/usr/bin/env bash
# `make test`'s pytest: the Kubernetes tier in a session of its own beside the other tiers. Run alone it took about
# half of the suite's time while mostly waiting on pods; beside the others that wait overlaps their work. Its output
# goes to a log that is printed after the other tiers' output, then both results on two lines; the exit code is
# non-zero when either session failed. Extra arguments go to both sessions.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOGS=${MYSPROJ_TEST_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/mysproj-test-logs.XXXXXX")}
mkdir -p "$LOGS"

# Fixed temporary roots (pytest empties them first): the two sessions never share one, and a node left behind by
# a killed session is found at a known place (k8s/README.md).
"$PY" -m pytest -q -rfEs --durations=15 -p no:cacheprovider -m kube \
    --basetemp="${TMPDIR:-/tmp}/mysproj-tests-kube" "$@" >"$LOGS/kube.log" 2>&1 &
kube=$!
trap 'kill -INT "$kube" 2>/dev/null; wait "$kube"; exit 130' INT TERM

"$PY" -m pytest -q -rfEs --durations=15 -m "not kube" --basetemp="${TMPDIR:-/tmp}/mysproj-tests" "$@"
rest=$?
wait "$kube"
kube_rc=$?
trap - INT TERM

echo
echo "==================== the Kubernetes tier (pytest -m kube, run beside the above; log: $LOGS/kube.log)"
cat "$LOGS/kube.log"
echo "==================== results"
echo "other tiers (pytest -m 'not kube'): $(if [ $rest -eq 0 ]; then echo passed; else echo "FAILED (exit $rest)"; fi)"
echo "Kubernetes tier (pytest -m kube): $(if [ $kube_rc -eq 0 ]; then echo passed; else echo "FAILED (exit $kube_rc)"; fi)"
[ $rest -eq 0 ] && [ $kube_rc -eq 0 ]
