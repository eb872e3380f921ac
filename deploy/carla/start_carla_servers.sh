#!/usr/bin/env bash
# Start, check and stop N off-screen CARLA 0.9.16 servers, one per rollout worker.
#
#   start_carla_servers.sh start  -n N [options] [-- extra CarlaUE4.sh flags]
#   start_carla_servers.sh stop   [--run-dir DIR]
#   start_carla_servers.sh status [--run-dir DIR]
#   start_carla_servers.sh ports  -n N [--base-port P] [--tm-base T]   (print the port plan)
#
# Server i (0-based) listens on RPC port  P_i = base + 3*i, streaming P_i + 1,
# secondary (multi-GPU) P_i + 2; its rollout worker runs the Traffic Manager on
# tm_base + i. See deploy/carla/README.md. Not exercised against a real server
# in this repository's CI.
#
# Options:
#   -n, --num-servers N    servers to start (required for start/ports)
#   --carla-root DIR       packaged CARLA 0.9.16 (contains CarlaUE4.sh); default $CARLA_ROOT
#   --base-port P          RPC port of server 0 (default 2000)
#   --tm-base T            Traffic Manager port of worker 0 (default 8000)
#   --gpus LIST            comma-separated -graphicsadapter indices, assigned round-robin
#                          (default 0)
#   --quality Q            -quality-level: Low or Epic (default Low)
#   --run-dir DIR          PID files, port table and logs (default ./carla-run)
#   --wait S               seconds to wait for each server to answer (default 300)
#   --check-timeout S      timeout of each carla-check probe (default 5)
#
# Environment: CARLA_CHECK overrides the probe command (default: `td3drive carla-check`
# when that subcommand exists, else `python -m rollout_workers.carla.check`).
set -euo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "start_carla_servers: $*" >&2; exit 1; }

cmd="${1:-}"
[[ -n "$cmd" ]] || { usage; exit 2; }
shift

num=""
carla_root="${CARLA_ROOT:-}"
base_port=2000
tm_base=8000
gpus="0"
quality="Low"
run_dir="./carla-run"
wait_s=300
check_timeout=5
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-servers) num="$2"; shift 2 ;;
    --carla-root) carla_root="$2"; shift 2 ;;
    --base-port) base_port="$2"; shift 2 ;;
    --tm-base) tm_base="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --quality) quality="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    --wait) wait_s="$2"; shift 2 ;;
    --check-timeout) check_timeout="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
rpc_port() { echo $((base_port + 3 * $1)); }
tm_port() { echo $((tm_base + $1)); }

check_plan() {
  is_int "$num" && [[ "$num" -ge 1 ]] || die "-n must be a positive integer"
  is_int "$base_port" && is_int "$tm_base" || die "ports must be integers"
  local last_rpc=$(( $(rpc_port $((num - 1))) + 2 )) last_tm=$(tm_port $((num - 1)))
  [[ $last_rpc -le 65535 && $last_tm -le 65535 ]] || die "ports run past 65535"
  # The TM ports must not fall inside any server's three ports.
  if [[ $tm_base -le $last_rpc && $last_tm -ge $base_port ]]; then
    die "TM ports $tm_base-$last_tm overlap server ports $base_port-$last_rpc"
  fi
}

port_in_use() {  # true if something listens on TCP port $1 on this host
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)
EOF
}

probe_cmd() {
  if [[ -n "${CARLA_CHECK:-}" ]]; then
    echo "$CARLA_CHECK"
  elif command -v td3drive >/dev/null 2>&1 && td3drive carla-check --help >/dev/null 2>&1; then
    echo "td3drive carla-check"
  else
    echo "python3 -m rollout_workers.carla.check"
  fi
}

print_plan() {
  printf '%-7s %-6s %-10s %-10s %-8s %s\n' worker rpc streaming secondary tm_port gpu
  IFS=',' read -r -a gpu_list <<<"$gpus"
  for ((i = 0; i < num; i++)); do
    local p; p=$(rpc_port "$i")
    printf '%-7s %-6s %-10s %-10s %-8s %s\n' "$i" "$p" $((p + 1)) $((p + 2)) \
      "$(tm_port "$i")" "${gpu_list[$((i % ${#gpu_list[@]}))]}"
  done
}

stop_servers() {
  local table="$run_dir/servers.tsv" status=0
  [[ -f "$table" ]] || { echo "no servers recorded in $table"; return 0; }
  while IFS=$'\t' read -r i pgid rpc _tm _gpu _log; do
    [[ "$i" == "worker" ]] && continue
    if kill -0 -- "-$pgid" 2>/dev/null; then
      echo "stopping server $i (process group $pgid, port $rpc)"
      kill -TERM -- "-$pgid" 2>/dev/null || true
      for _ in $(seq 1 30); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 1; done
      if kill -0 -- "-$pgid" 2>/dev/null; then
        echo "server $i did not exit after SIGTERM; sending SIGKILL"
        kill -KILL -- "-$pgid" 2>/dev/null || status=1
      fi
    else
      echo "server $i (process group $pgid) is not running"
    fi
    rm -f "$run_dir/carla_$i.pid"
  done <"$table"
  rm -f "$table"
  return $status
}

status_servers() {
  local table="$run_dir/servers.tsv" probe status=0
  [[ -f "$table" ]] || { echo "no servers recorded in $table"; return 1; }
  probe=$(probe_cmd)
  while IFS=$'\t' read -r i pgid rpc tm gpu log; do
    [[ "$i" == "worker" ]] && continue
    if ! kill -0 -- "-$pgid" 2>/dev/null; then
      echo "server $i: process group $pgid is gone (log: $log)"; status=1; continue
    fi
    if $probe --host 127.0.0.1 --port "$rpc" --timeout "$check_timeout" >/dev/null 2>&1; then
      echo "server $i: up, rpc $rpc, tm_port $tm, gpu $gpu"
    else
      echo "server $i: running but not answering on $rpc (log: $log)"; status=1
    fi
  done <"$table"
  return $status
}

start_servers() {
  check_plan
  [[ -n "$carla_root" ]] || die "set --carla-root or CARLA_ROOT to the CARLA 0.9.16 directory"
  [[ -x "$carla_root/CarlaUE4.sh" ]] || die "$carla_root/CarlaUE4.sh not found or not executable"
  [[ "$quality" == "Low" || "$quality" == "Epic" ]] || die "--quality must be Low or Epic"
  mkdir -p "$run_dir"
  run_dir=$(cd "$run_dir" && pwd)
  [[ ! -f "$run_dir/servers.tsv" ]] || die "$run_dir/servers.tsv exists: run '$0 stop --run-dir $run_dir' first"
  for ((i = 0; i < num; i++)); do
    local p; p=$(rpc_port "$i")
    for port in "$p" $((p + 1)) $((p + 2)) "$(tm_port "$i")"; do
      if port_in_use "$port"; then die "port $port (server $i) is already in use"; fi
    done
  done

  IFS=',' read -r -a gpu_list <<<"$gpus"
  printf 'worker\tpgid\trpc\ttm_port\tgpu\tlog\n' >"$run_dir/servers.tsv"
  for ((i = 0; i < num; i++)); do
    local p gpu log pidfile
    p=$(rpc_port "$i")
    gpu="${gpu_list[$((i % ${#gpu_list[@]}))]}"
    log="$run_dir/carla_$i.log"
    pidfile="$run_dir/carla_$i.pid"
    # setsid: the server gets its own process group (CarlaUE4.sh starts the real binary
    # as a child), so `stop` can signal exactly the processes this script started.
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidfile" \
      "$carla_root/CarlaUE4.sh" -RenderOffScreen -nosound \
      "-carla-rpc-port=$p" "-carla-streaming-port=$((p + 1))" "-carla-secondary-port=$((p + 2))" \
      "-graphicsadapter=$gpu" "-quality-level=$quality" "${extra[@]}" \
      >"$log" 2>&1 </dev/null &
    for _ in $(seq 1 50); do [[ -s "$pidfile" ]] && break; sleep 0.1; done
    [[ -s "$pidfile" ]] || die "server $i did not start (see $log)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$(cat "$pidfile")" "$p" "$(tm_port "$i")" "$gpu" "$log" \
      >>"$run_dir/servers.tsv"
    echo "server $i: pid $(cat "$pidfile"), rpc $p, tm_port $(tm_port "$i"), gpu $gpu, log $log"
  done

  local probe; probe=$(probe_cmd)
  echo "waiting up to ${wait_s}s for each server to answer: $probe"
  for ((i = 0; i < num; i++)); do
    local p pgid deadline
    p=$(rpc_port "$i")
    pgid=$(cat "$run_dir/carla_$i.pid")
    deadline=$((SECONDS + wait_s))
    until $probe --host 127.0.0.1 --port "$p" --timeout "$check_timeout" >/dev/null 2>&1; do
      if ! kill -0 -- "-$pgid" 2>/dev/null; then
        echo "server $i exited; last lines of $run_dir/carla_$i.log:" >&2
        tail -n 30 "$run_dir/carla_$i.log" >&2 || true
        stop_servers; exit 1
      fi
      if [[ $SECONDS -ge $deadline ]]; then
        echo "server $i did not answer on port $p within ${wait_s}s" >&2
        tail -n 30 "$run_dir/carla_$i.log" >&2 || true
        stop_servers; exit 1
      fi
      sleep 2
    done
    echo "server $i is up on port $p"
  done
  echo "all $num servers up; table in $run_dir/servers.tsv; stop with: $0 stop --run-dir $run_dir"
}

case "$cmd" in
  start) start_servers ;;
  stop) stop_servers ;;
  status) status_servers ;;
  ports) check_plan; print_plan ;;
  -h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac
