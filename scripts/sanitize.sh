#!/usr/bin/env bash
# Build the relay engine with a sanitizer in a scratch copy of the tree and run the relay tests
# against it (the contract suite on every C backend, and the relay processes).
#
#   bash scripts/sanitize.sh thread     # ThreadSanitizer: data races between engine threads
#   bash scripts/sanitize.sh address    # AddressSanitizer + UndefinedBehaviorSanitizer
#
# Needs the project's .venv (make setup) and gcc's libtsan / libasan. Exits non-zero when the
# tests fail or the sanitizer reports anything; reports are printed.
set -euo pipefail
kind=${1:-thread}
repo=$(cd "$(dirname "$0")/.." && pwd)
py="$repo/.venv/bin/python"
work=$(mktemp -d /tmp/edgegw-sanitize.XXXXXX)
trap 'rm -rf "$work"' EXIT
git -C "$repo" archive HEAD | tar -x -C "$work/"
mkdir -p "$work/cython"
"$py" -m pip install -q --target "$work/cython" cython
case "$kind" in
  thread)  flags="-fsanitize=thread"; lib=libtsan.so.2
           export TSAN_OPTIONS="halt_on_error=0 log_path=$work/report" ;;
  address) flags="-fsanitize=address,undefined -fno-omit-frame-pointer"; lib=libasan.so.8
           export ASAN_OPTIONS="detect_leaks=0 log_path=$work/report"
           export UBSAN_OPTIONS="print_stacktrace=1 log_path=$work/report" ;;
  *) echo "usage: $0 thread|address" >&2; exit 2 ;;
esac
preload=$(gcc -print-file-name="$lib")
cd "$work"
CFLAGS="$flags -g -O1" LDFLAGS="$flags" PYTHONPATH="$work/cython" \
  "$py" setup.py -q build_ext --inplace >/dev/null
status=0
LD_PRELOAD="$preload" "$py" -m pytest -q -p no:cacheprovider tests/test_relay.py \
  tests/test_relay_procs.py -k "Splice or Select or ProcRelay or procs or racing or descriptor" || status=$?
if compgen -G "$work/report*" >/dev/null; then
  cat "$work"/report*
  echo "sanitize: $kind sanitizer reported problems (above)" >&2
  exit 1
fi
echo "sanitize: $kind: no reports"
exit $status
