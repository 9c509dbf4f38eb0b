#!/usr/bin/env node
// Builds the native addon (native/ -> build/Release/moe_native.node) with cmake-js.
//
// Run by `npm install` and before `npm test`, so a build with nothing changed must be
// a quick no-op: when build/ was configured with the same settings we only run
// `cmake-js build` (ninja/make then decide what is stale); any changed setting
// reconfigures first.
//
// Settings (environment):
//   MOE_SERVE_CUDA=0|1       0: CPU only; 1: CUDA required (fails without nvcc);
//                            unset: CUDA when nvcc is found (PATH, /usr/local/cuda/bin),
//                            falling back to CPU only, with a warning, if that build fails.
//   MOE_SERVE_CUDA_ARCHS     CUDA architectures, e.g. "80;90" (default 75;80;86;89;90).
//   MOE_SERVE_BUILD_VERBOSE=1  stream the cmake-js output instead of only keeping a log.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SOURCE_DIR = path.join(ROOT, 'native');
const OUT_DIR = path.join(ROOT, 'build');
const ADDON = path.join(OUT_DIR, 'Release', 'moe_native.node');
const STAMP = path.join(OUT_DIR, 'moe-native-config.json');
const LOG = path.join(OUT_DIR, 'moe-native-build.log');
const CMAKE_JS = path.join(ROOT, 'node_modules', '.bin', 'cmake-js');
const DEFAULT_CUDA_ARCHS = '75;80;86;89;90';

function fail(message) {
  console.error(`moe-serve native build failed: ${message}`);
  process.exit(1);
}

function isExecutable(file) {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

function findNvcc() {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (dir && isExecutable(path.join(dir, 'nvcc'))) return path.join(dir, 'nvcc');
  }
  const fallback = '/usr/local/cuda/bin/nvcc';
  return isExecutable(fallback) ? fallback : null;
}

function nvccVersion(nvcc) {
  const r = spawnSync(nvcc, ['--version'], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  const m = /release (\d+\.\d+)/.exec(r.stdout);
  return m ? m[1] : 'unknown';
}

/** Decides CPU-only vs CUDA from MOE_SERVE_CUDA and the presence of nvcc. */
function cudaSettings() {
  const mode = process.env.MOE_SERVE_CUDA ?? '';
  if (!['', '0', '1'].includes(mode)) {
    fail(`MOE_SERVE_CUDA must be 0, 1 or unset, got '${mode}'`);
  }
  if (mode === '0') return { enabled: false };
  const nvcc = findNvcc();
  const version = nvcc ? nvccVersion(nvcc) : null;
  if (!nvcc || !version) {
    if (mode === '1') {
      fail(
        nvcc
          ? `MOE_SERVE_CUDA=1 but '${nvcc} --version' does not run`
          : 'MOE_SERVE_CUDA=1 but nvcc was not found on PATH or at /usr/local/cuda/bin/nvcc',
      );
    }
    return { enabled: false };
  }
  const archs = (process.env.MOE_SERVE_CUDA_ARCHS ?? '').trim() || DEFAULT_CUDA_ARCHS;
  if (!/^[0-9a-z]+(-real|-virtual)?(;[0-9a-z]+(-real|-virtual)?)*$/.test(archs) && archs !== 'native' && archs !== 'all' && archs !== 'all-major') {
    fail(`MOE_SERVE_CUDA_ARCHS must look like "80;86;90", got '${archs}'`);
  }
  return { enabled: true, nvcc, version, archs };
}

/** Node's own headers, so cmake-js does not try to download them. */
function nodeDir() {
  if (process.env.npm_config_nodedir) return process.env.npm_config_nodedir;
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  return fs.existsSync(path.join(prefix, 'include', 'node', 'node.h')) ? prefix : null;
}

function nodeAddonApiDir() {
  try {
    const require = createRequire(path.join(ROOT, 'package.json'));
    return String(require('node-addon-api').include).replace(/"/g, '');
  } catch {
    fail("node-addon-api is not installed; run 'npm install'");
  }
}

function readStamp() {
  try {
    return fs.readFileSync(STAMP, 'utf8');
  } catch {
    return null;
  }
}

/** Runs one cmake-js command; returns null on success, else a failure message. */
function runCmakeJs(command, args, env, verbose) {
  const r = spawnSync(CMAKE_JS, [command, ...args], {
    cwd: ROOT,
    env,
    encoding: 'utf8',
    stdio: verbose ? 'inherit' : 'pipe',
    maxBuffer: 256 * 1024 * 1024,
  });
  if (!verbose) fs.appendFileSync(LOG, `$ cmake-js ${command} ${args.join(' ')}\n${r.stdout ?? ''}${r.stderr ?? ''}`);
  if (r.error) fail(`could not run cmake-js: ${r.error.message}`);
  if (r.status === 0) return null;
  // Start the next attempt from a fresh configure.
  fs.rmSync(STAMP, { force: true });
  if (!verbose) {
    const lines = `${r.stdout ?? ''}${r.stderr ?? ''}`.trimEnd().split('\n');
    console.error(lines.slice(-40).join('\n'));
  }
  return `'cmake-js ${command}' exited with status ${r.status}`;
}

/** Configures (when needed) and builds; returns null on success, else a failure message. */
function build(cuda, verbose) {
  const defines = {
    NODE_ADDON_API_DIR: nodeAddonApiDir(),
    MOE_WITH_CUDA: cuda.enabled ? 'ON' : 'OFF',
  };
  if (cuda.enabled) {
    defines.CMAKE_CUDA_COMPILER = cuda.nvcc;
    defines.CMAKE_CUDA_ARCHITECTURES = cuda.archs;
  }
  const jobs = Math.max(1, os.availableParallelism?.() ?? os.cpus().length);
  const args = ['-d', SOURCE_DIR, '-O', OUT_DIR, '--parallel', String(jobs)];
  for (const [key, value] of Object.entries(defines)) args.push(`--CD${key}=${value}`);
  if (!verbose) args.push('--log-level', 'warn');

  const nodedir = nodeDir();
  const env = { ...process.env };
  if (nodedir) env.npm_config_nodedir = nodedir;

  // Everything that, when changed, must reach CMake through a fresh configure.
  const stamp = JSON.stringify({ defines, nodedir, cudaVersion: cuda.version ?? null, node: process.version }, null, 2);
  fs.mkdirSync(OUT_DIR, { recursive: true });
  fs.writeFileSync(LOG, '');
  const configured = fs.existsSync(path.join(OUT_DIR, 'CMakeCache.txt')) && readStamp() === stamp;
  if (!configured) {
    // A fresh cache: CMake cannot switch some settings in place (a changed
    // CMAKE_CUDA_COMPILER makes it wipe the cache and drop every -D we passed).
    // Object files stay, so unchanged sources are not recompiled.
    fs.rmSync(STAMP, { force: true });
    fs.rmSync(path.join(OUT_DIR, 'CMakeCache.txt'), { force: true });
    const error = runCmakeJs('configure', args, env, verbose);
    if (error) return error;
    fs.writeFileSync(STAMP, stamp);
  }
  const error = runCmakeJs('build', args, env, verbose);
  if (error) return error;
  if (!fs.existsSync(ADDON)) return `the build finished but ${path.relative(ROOT, ADDON)} is missing`;
  return null;
}

function main() {
  if (!isExecutable(CMAKE_JS)) fail("cmake-js is not installed; run 'npm install'");
  const verbose = process.env.MOE_SERVE_BUILD_VERBOSE === '1';
  let cuda = cudaSettings();
  let error = build(cuda, verbose);
  if (error && cuda.enabled && (process.env.MOE_SERVE_CUDA ?? '') === '') {
    // Auto mode: a toolkit that cannot build us must not make `npm install` fail.
    const cudaLog = path.join(OUT_DIR, 'moe-native-build-cuda.log');
    fs.copyFileSync(LOG, cudaLog);
    console.warn(
      `moe-serve native build: the CUDA build failed (${error}; log: ${cudaLog}); building CPU only. ` +
        'Set MOE_SERVE_CUDA=1 to make this an error, MOE_SERVE_CUDA=0 to skip CUDA.',
    );
    cuda = { enabled: false };
    error = build(cuda, verbose);
  }
  if (error) fail(`${error}${verbose ? '' : ` (full log: ${LOG})`}`);

  const what = cuda.enabled ? `CPU+CUDA (nvcc ${cuda.version}, archs ${cuda.archs})` : 'CPU only';
  console.log(`moe-serve native addon: ${what} -> ${path.relative(ROOT, ADDON)}`);
}

main();
