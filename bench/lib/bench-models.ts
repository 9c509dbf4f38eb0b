// The benchmark's generated models: real models' shapes (fewer layers) with random
// weights, written once as bf16 Hugging Face checkpoints under the cache directory
// (`<cacheDir>/bench-models/`) with their GGUF exports beside them, and reused after.
// Everything is written under a temporary name and renamed into place at the end, so an
// interrupted run never leaves a model that looks complete.

import { existsSync, mkdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { envSettings } from '../../src/config.js';
import { exportGguf, type GgufExportType } from '../../src/model/gguf-export.js';
import { makeModel } from '../../src/model/make-model.js';
import type { Architecture } from '../../src/model/spec.js';

/** Bump when what is generated changes, so stale caches are not reused. */
const REVISION = 1;
const SEED = 7;
/** Safetensors shards are cut at about this size. */
const SHARD_BYTES = 512 * 2 ** 20;

export interface BenchModel {
  key: string;
  arch: Architecture;
  preset: string;
  /** bf16 bytes of the checkpoint, to choose the shard count. */
  approxBytes: number;
}

export const BENCH_MODELS: Record<'qwen' | 'mixtral', BenchModel> = {
  qwen: { key: 'qwen', arch: 'qwen3_moe', preset: 'qwen3-30b-a3b-8l', approxBytes: 11.3e9 },
  mixtral: { key: 'mixtral', arch: 'mixtral', preset: 'mixtral-8x7b-2l', approxBytes: 6.3e9 },
};

export function benchModelsDir(): string {
  return join(envSettings().cacheDir, 'bench-models');
}

function baseName(m: BenchModel): string {
  return `${m.arch}-${m.preset}-seed${SEED}-bf16-r${REVISION}`;
}

const MARKER = 'bench-complete';

/** The checkpoint directory, generated on first use. */
export function ensureCheckpoint(m: BenchModel, log: (s: string) => void): string {
  const root = benchModelsDir();
  const dir = join(root, baseName(m));
  if (existsSync(join(dir, MARKER))) return dir;
  mkdirSync(root, { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  rmSync(dir, { recursive: true, force: true });
  const shards = Math.max(1, Math.ceil(m.approxBytes / SHARD_BYTES));
  log(`generating ${m.preset} (${m.arch}, bf16, ${shards} shards) into ${dir} ...`);
  const t0 = performance.now();
  try {
    makeModel({ arch: m.arch, out: tmp, preset: m.preset, seed: SEED, dtype: 'bf16', shards });
    // The marker goes in last, inside the temporary directory, so a renamed directory is always whole.
    mkdirSync(join(tmp, MARKER));
    renameSync(tmp, dir);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
  log(`generated ${m.preset} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return dir;
}

/** The GGUF export of the checkpoint in `type`, written on first use. */
export async function ensureGguf(m: BenchModel, checkpointDir: string, type: GgufExportType, log: (s: string) => void): Promise<string> {
  // v2: q4_0 exports hold the dense matrices at Q8_0 (the engine's q4 mix); v3: Q4_0
  // rounds in float32 as the engine packs it (v2 files differ in a few nibbles).
  const file = join(benchModelsDir(), `${baseName(m)}.${type}${type === 'q4_0' ? '.v3' : ''}.gguf`);
  if (existsSync(file) && statSync(file).size > 0) return file;
  const tmp = `${file}.tmp-${process.pid}`;
  rmSync(tmp, { force: true });
  log(`exporting ${m.preset} to GGUF ${type} (${file}) ...`);
  const t0 = performance.now();
  try {
    await exportGguf(checkpointDir, tmp, type);
    renameSync(tmp, file);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  log(`exported GGUF ${type} of ${m.preset} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return file;
}
