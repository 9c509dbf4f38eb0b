# syntax=docker/dockerfile:1
#
# moe-serve container image, two variants from one file:
#
#   docker build -t moe-serve:cuda .                          # GPU (default): CUDA build, CUDA runtime base
#   docker build -t moe-serve:cpu --build-arg VARIANT=cpu .   # CPU only: plain Debian bases
#
# Every base image is a build argument, so a mirror or a locally made base can stand in
# (scripts/container-smoke.sh builds the CPU variant from a debootstrapped Debian base).
# Node 20 is taken from NODE_IMAGE (/usr/local/bin/node, npm and the headers under
# /usr/local, as in the official node images) and copied into the build and runtime
# stages, so the CUDA and Debian bases need no Node of their own.
#
# Run (settings are environment variables, see the README's configuration table):
#
#   docker run -p 8000:8000 -e MOE_SERVE_DEMO=1 moe-serve:cpu
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro \
#       -e MOE_SERVE_MODEL=/models/Qwen3-30B-A3B moe-serve:cuda
#
# Paths in the image:
#   /models                 where model checkpoints are mounted (read-only is enough);
#                           MOE_SERVE_MODEL=/models/<checkpoint directory>
#   /var/cache/moe-serve    MOE_SERVE_CACHE_DIR: the built-in demo model is generated here
#                           on first use; writable by the server's user (uid 10001). Mount
#                           a volume here to keep it across restarts.
#
# The server runs as uid/gid 10001 (non-root), listens on 0.0.0.0:8000, and is PID 1 via
# the exec form of ENTRYPOINT, so `docker stop` / Kubernetes' SIGTERM reaches it: /ready
# turns 503, in-flight requests finish within MOE_SERVE_DRAIN_GRACE_SECONDS (30), then it
# exits 0. Give the runtime a stop timeout longer than that grace (docker stop -t 40;
# terminationGracePeriodSeconds in deploy/).

ARG VARIANT=cuda
ARG NODE_IMAGE=node:20-bookworm-slim
ARG CUDA_BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu22.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.6.3-base-ubuntu22.04
ARG CPU_BUILD_IMAGE=debian:bookworm
ARG CPU_RUNTIME_IMAGE=debian:bookworm-slim

FROM ${NODE_IMAGE} AS node

# ---- build ------------------------------------------------------------------------
FROM ${CUDA_BUILD_IMAGE} AS build-base-cuda
# 1: the CUDA sources must compile (no silent CPU-only fallback in the GPU image).
ENV MOE_SERVE_CUDA=1

FROM ${CPU_BUILD_IMAGE} AS build-base-cpu
ENV MOE_SERVE_CUDA=0

FROM build-base-${VARIANT} AS build
ARG CUDA_ARCHS=75;80;86;89;90
ENV MOE_SERVE_CUDA_ARCHS=${CUDA_ARCHS} \
    DEBIAN_FRONTEND=noninteractive \
    npm_config_update_notifier=false
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates g++ make cmake \
 && rm -rf /var/lib/apt/lists/*
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/include/node /usr/local/include/node
COPY --from=node /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
RUN ln -sf ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -sf ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
 && node --version && npm --version

WORKDIR /src
# Dependencies first (cached while package*.json do not change). --ignore-scripts: the
# project's own install/prepare scripts run below, explicitly; no dependency needs its
# install script to serve (onnxruntime-node's is skipped by .npmrc anyway, and
# node-llama-cpp/esbuild are test tools). --omit=optional leaves out node-llama-cpp's
# prebuilt llama.cpp binaries (hundreds of MB, dev only); the production tree has no
# optional dependency.
COPY package.json package-lock.json .npmrc ./
RUN npm install --no-audit --no-fund --ignore-scripts --omit=optional

# The native addon (cmake-js; CUDA per MOE_SERVE_CUDA above).
COPY native/ native/
COPY scripts/build-native.mjs scripts/
RUN node scripts/build-native.mjs

# The TypeScript.
COPY tsconfig.json tsconfig.build.json ./
COPY src/ src/
COPY config/ config/
RUN npx tsc -p tsconfig.build.json

# Production dependencies only (no tap, tsx, typescript, node-llama-cpp, openai). The
# server never loads onnxruntime-node (a test oracle, ~290 MB), nor the build tools
# cmake-js / node-addon-api once the addon is built: drop them too.
RUN npm prune --omit=dev --no-audit --no-fund \
 && rm -rf node_modules/onnxruntime-node node_modules/cmake-js node_modules/node-addon-api node_modules/.package-lock.json \
 && node -e "for (const m of ['tap','tsx','typescript','node-llama-cpp','openai']) { try { require.resolve(m); console.error('dev dependency left in the image: ' + m); process.exit(1); } catch {} }"

# ---- runtime ----------------------------------------------------------------------
FROM ${CUDA_RUNTIME_IMAGE} AS runtime-base-cuda
# The addon links the CUDA runtime statically; the driver comes from the host
# (NVIDIA container toolkit / the Kubernetes device plugin).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${CPU_RUNTIME_IMAGE} AS runtime-base-cpu

FROM runtime-base-${VARIANT} AS runtime
ARG VARIANT
COPY --from=node /usr/local/bin/node /usr/local/bin/node
RUN groupadd --system --gid 10001 moe \
 && useradd --system --uid 10001 --gid moe --home-dir /var/cache/moe-serve --no-create-home --shell /usr/sbin/nologin moe \
 && mkdir -p /models /var/cache/moe-serve \
 && chown 10001:10001 /var/cache/moe-serve \
 && chmod 0755 /models

WORKDIR /app
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules/ node_modules/
COPY --from=build /src/build/Release/moe_native.node build/Release/moe_native.node
COPY --from=build /src/dist/ dist/
COPY --from=build /src/config/ config/
COPY bin/ bin/

# Every setting is an environment variable (MOE_SERVE_*); these are the container's
# defaults. Choose the model with MOE_SERVE_MODEL=/models/<dir> or MOE_SERVE_DEMO=1.
ENV NODE_ENV=production \
    HOME=/var/cache/moe-serve \
    MOE_SERVE_HOST=0.0.0.0 \
    MOE_SERVE_PORT=8000 \
    MOE_SERVE_CACHE_DIR=/var/cache/moe-serve \
    MOE_SERVE_IMAGE_VARIANT=${VARIANT}

USER 10001:10001
EXPOSE 8000
# Liveness only (/health); readiness (/ready: 503 while loading or draining) is for the
# load balancer / Kubernetes readinessProbe. Uses Node's fetch: the image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.MOE_SERVE_PORT || 8000) + '/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
STOPSIGNAL SIGTERM
# Exec form: node is PID 1 and gets SIGTERM itself (the server installs handlers for
# SIGTERM/SIGINT, so PID 1's default of ignoring them does not apply).
ENTRYPOINT ["node", "/app/bin/moe-serve.js"]
CMD ["serve"]
