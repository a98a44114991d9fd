#!/usr/bin/env bash
# Start a Ray head on this machine for `ray job submit`: the dashboard (which serves the Jobs API, i.e.
# runs whatever code is submitted) listens on 127.0.0.1 only, and token authentication is on.
#
#   cluster/start-local-head.sh [more `ray start` flags, e.g. --num-cpus 8 --temp-dir DIR --block]
#
# Environment: RAY_PORT (GCS port, default 6379), RAY_DASHBOARD_PORT (default 8265), and the token as Ray
# reads it: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (created here once).
# Ray's own gRPC ports (GCS, raylet, object manager) listen on every interface whatever the flags say; the
# token is what guards them, so keep this machine's firewall closed to them as well.
set -euo pipefail

port="${RAY_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"

# Explicit token mode: without it Ray 2.60's `ray start` turns auth on only when it happens to find a token,
# and silently starts an open cluster otherwise. With it, a missing token is an error.
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  ray get-auth-token --generate >/dev/null
  chmod 600 "$HOME/.ray/auth_token"  # Ray writes it with the default umask; it is a password
fi

args=(--head --port="$port" --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port"
      --disable-usage-stats "$@")

instructions() {
  cat <<EOF

Ray head: dashboard and Jobs API on http://127.0.0.1:$dashboard_port (this machine only; token required).
Every client needs token mode and the token (the same RAY_AUTH_TOKEN[_PATH] or ~/.ray/auth_token):
  export RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port
  ray job submit --working-dir . -- python ray_job.py --config configs/paper.yaml
  ray job logs -f JOB_ID      ray job status JOB_ID      ray job stop JOB_ID      ray job list
Stop the head: ray stop (or Ctrl-C when started with --block).
EOF
}

if [[ " $* " == *" --block "* ]]; then
  instructions
  exec ray start "${args[@]}"
fi
ray start "${args[@]}"
instructions
