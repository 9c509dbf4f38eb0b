// Fixture models for tests: generated, never stored. In-memory reference models need
// no files; checkpoint directories go to a temporary directory removed at teardown.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initTensor, makeModel, specForPreset, type MakeModelOptions } from '../../src/model/make-model.js';
import { ReferenceModel } from '../../src/model/reference.js';
import type { Architecture, ModelSpec } from '../../src/model/spec.js';
import { checkpointTensors } from '../../src/model/tensor-names.js';

export function tempDir(t: { teardown(fn: () => void): void }, prefix = 'moe-serve-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** The tiny preset's spec of an architecture, with optional overrides. */
export function tinySpec(arch: Architecture, overrides: Partial<ModelSpec> = {}): ModelSpec {
  return specForPreset(arch, 'tiny', overrides).spec;
}

/** A reference model with the same weights make-model would write for (spec, seed). */
export function memoryModel(spec: ModelSpec, seed = 0): ReferenceModel {
  const byName = new Map(checkpointTensors(spec).map((t) => [t.name, t]));
  return ReferenceModel.fromSource(spec, (name) => {
    const t = byName.get(name);
    if (!t) throw new Error(`no tensor ${name}`);
    return initTensor(t, seed);
  });
}

export function writeModel(t: { teardown(fn: () => void): void }, opts: Omit<MakeModelOptions, 'out'>): string {
  const dir = join(tempDir(t), 'model');
  makeModel({ ...opts, out: dir });
  return dir;
}

/** max |a - b| / max(1, max |a|): the error relative to the values' magnitude. */
export function relMaxError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let err = 0;
  let mag = 1;
  for (let i = 0; i < a.length; i++) {
    err = Math.max(err, Math.abs(a[i] - b[i]));
    mag = Math.max(mag, Math.abs(a[i]));
  }
  return err / mag;
}
