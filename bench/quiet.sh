#!/usr/bin/env bash
# Run a benchmark command with this machine's training run paused (SIGSTOP), resumed on any exit.
#   bench/quiet.sh LIMIT_S OUT.txt CMD...
# Waits up to 5 min for no pytest, holds a lock so that two paused windows never overlap (the first to end
# would resume the training under the other), stops CMD after LIMIT_S seconds, and records uptime and the
# busiest processes before and after.
set -u
limit=$1 out=$2; shift 2
exec 9>/tmp/dclgan-quiet.lock
flock 9
for _ in $(seq 60); do pgrep -f "python -m pytest" >/dev/null || break; sleep 5; done
pids=$(pgrep -f "dclgan train" || true)
trap '[ -n "$pids" ] && kill -CONT $pids' EXIT
trap 'exit 143' TERM INT
[ -n "$pids" ] && kill -STOP $pids
{
  date -u; uptime; echo "pytest running: $(pgrep -fc 'python -m pytest')"
  ps -eo pid,pcpu,cmd --sort=-pcpu | head -5 | cut -c1-100
  timeout "$limit" "$@"
  date -u; uptime; echo "pytest running: $(pgrep -fc 'python -m pytest')"
} 2>&1 | tee "$out"
