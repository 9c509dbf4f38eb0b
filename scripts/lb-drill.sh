#!/usr/bin/env bash
# Load-balancer drill: nginx on loopback in front of two moe-serve replicas (demo model,
# native runner), a real Prometheus scraping both, SIGTERM and SIGKILL mid-stream.
# The drill itself is test/deploy-lb-drill.test.ts (so `npm test` runs it too, and skips
# it with the reason when nginx is missing); this runs it alone, after the build.
#
#   apt-get install nginx-light prometheus    # nginx is required; prometheus optional
#   bash scripts/lb-drill.sh
#
# Bounded: ~20 s here (2 cores), 60 fixed requests, loopback only; every process it
# starts is ended by its pid when it finishes or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { echo "lb-drill: nginx is not installed (apt-get install nginx-light)" >&2; exit 1; }
if [ ! -f dist/cli/main.js ] || [ ! -f build/Release/moe_native.node ]; then
  echo "lb-drill: building first (npm run build)" >&2
  npm run build
fi
exec npx tap --reporter=tap --disable-coverage test/deploy-lb-drill.test.ts
