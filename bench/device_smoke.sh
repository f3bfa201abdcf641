#!/usr/bin/env bash
# bench.gpu_smoke on the lent GPU machine, whose image lacks Prefect, TRL, datasets, Unsloth, openai, fastapi and
# uvicorn, and whose commands may run 10 minutes at most: start the runs detached, collect them in later calls.
#
# Here, once (from the repository root; .carry/ is git-ignored, 64 MiB at most travel):
#   bash ../shared/gpu/make_site.sh && (cd .site && tar cf - . | xz -6 > ../.carry/site.tar.xz)
#   .carry/deps.tar.xz: the flow's own packages the image lacks (Prefect, openai, fastapi, uvicorn, ...: unpacked
#     cp312 manylinux wheels; `python -m bench.gpu_smoke --tiny --record-modules` lists what a run imports;
#     add pytest, pytest-timeout and psutil for `gputest`)
#   git archive HEAD | xz > .carry/src.tar.xz   (optional: runs the committed code, not a half-edited tree)
# Device calls (carry [".carry"]):
#   bash bench/device_smoke.sh start "NAME [gpu_smoke args]" ...   unpack (once), check imports, then run each
#                                                                   NAME in turn, detached, on one storage root
#   bash bench/device_smoke.sh bench [train_speed args]             the fair training bench, detached (NAME: bench)
#   bash bench/device_smoke.sh bench-here [train_speed args]        the same in the foreground, results to $OUT
#   bash bench/device_smoke.sh wait NAME SECONDS                    wait for NAME (at most SECONDS), collect it;
#                                                                   at once if this machine has no such run
#   bash bench/device_smoke.sh probe [attention_probe args]         bench.attention_probe in the foreground (~4 min)
#   bash bench/device_smoke.sh gputest                              the tests that need a GPU (tests/test_encode.py
#                                                                   skips them on a CPU), in the foreground
# What comes back under $OUT: NAME.md (the table), NAME.json, NAME.log (the flow's stderr), NAME.out and
# NAME-logs.tar.gz (every job's log: train's holds its compile phases and start-up parts).
set -uo pipefail
cd "$(dirname "$0")/.."
action=$1; shift

# The largest writable local disk holds the model (8.1 GB), the merged copies and the compiled kernels.
work=$(df -P -B1 --output=avail,target 2>/dev/null | tail -n +2 | sort -rn | while read -r _ target; do
  [ -w "$target" ] && { echo "$target"; break; }; done)
work=${SMOKE_ROOT:-${work:-/tmp}}/vlmpipe-smoke
mkdir -p "$work"
carry=$PWD/.carry

if [ ! -f /tmp/carry/.done ]; then
  mkdir -p /tmp/carry/site /tmp/carry/deps /tmp/carry/src
  tar xJf "$carry/site.tar.xz" -C /tmp/carry/site && tar xJf "$carry/deps.tar.xz" -C /tmp/carry/deps \
    || { echo "unpacking the carried packages failed"; exit 1; }
  [ -f "$carry/src.tar.xz" ] && tar xJf "$carry/src.tar.xz" -C /tmp/carry/src
  touch /tmp/carry/.done
fi
[ -f /tmp/carry/src/bench/gpu_smoke.py ] && cd /tmp/carry/src
export PYTHONPATH=/tmp/carry/site:/tmp/carry/deps:$PWD PYTHONUNBUFFERED=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1

case $action in
gputest)
  python3 -m pytest -p no:cacheprovider -q tests/test_encode.py -k gpu 2>&1 | tail -15
  ;;
start)
  python3 -c "import prefect, openai, fastapi, uvicorn, trl, datasets, jiwer, flows.cli, torch; \
print('imports ok; torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" || exit 1
  echo "code: $PWD; storage: $(df -h "$work" | tail -1)"
  script=""
  for run in "$@"; do
    read -r name args <<<"$run"
    script+="python3 -m bench.gpu_smoke --workdir '$work' --out '$work/out-$name' --name $name $args"
    script+=" >'$work/$name.out' 2>&1 </dev/null; echo \$? >'$work/$name.done'; "
  done
  setsid nohup bash -c "$script" >/dev/null 2>&1 </dev/null &
  echo "started: $*"
  ;;
probe)
  python3 -m bench.attention_probe --out "$OUT" "$@" >"$OUT/attention_probe.log" 2>&1
  echo "attention_probe exited $?"; grep -E '^(encode|train) ' "$OUT/attention_probe.log" || tail -20 "$OUT/attention_probe.log"
  ;;
bench)
  # bench.train_speed's fair comparison ((b), (b'), (c) from cold kernel caches), detached: collect it with
  # `wait bench SECONDS`.
  mkdir -p "$work/out-bench"
  setsid nohup bash -c "python3 -m bench.train_speed --workdir '$work/bench' --out '$work/out-bench' $* \
    >'$work/bench.out' 2>&1 </dev/null; echo \$? >'$work/bench.done'" >/dev/null 2>&1 </dev/null &
  echo "started: bench.train_speed $*"
  ;;
bench-here)
  # The same bench in the foreground, its results written straight to $OUT (they come back even if the call's
  # time limit cuts it short): for a short measurement in one call.
  python3 -m bench.train_speed --workdir "$work/bench" --out "$OUT" "$@" >"$OUT/bench.out" 2>&1
  echo "bench exited $?"; cat "$OUT/train_speed.md" 2>/dev/null || tail -20 "$OUT/bench.out"
  ;;
wait)
  name=$1; limit=${2:-500}; waited=0
  # A machine given back between calls comes back fresh, without the run: say so at once rather than wait.
  [ -f "$work/$name.out" ] || { echo "no run named $name on this machine (a fresh one?)"; exit 3; }
  while [ ! -f "$work/$name.done" ] && [ "$waited" -lt "$limit" ]; do sleep 5; waited=$((waited + 5)); done
  [ -f "$work/$name.done" ] && echo "$name exited $(cat "$work/$name.done") (waited ${waited}s)" \
    || echo "$name still running after ${waited}s"
  cp "$work/$name.out" "$work/out-$name/"* "$OUT/" 2>/dev/null
  tail -3 "$work/$name.out" 2>/dev/null
  # One archive: the device tool brings back only a few files a call, and a smoke writes a log per job.
  [ -d "$work/out-$name/logs" ] && tar czf "$OUT/$name-logs.tar.gz" -C "$work/out-$name" logs
  cat "$work/out-$name/$name.md" "$work/out-$name/train_speed.md" 2>/dev/null || tail -25 "$work/out-$name/$name.log" 2>/dev/null
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  ;;
esac
