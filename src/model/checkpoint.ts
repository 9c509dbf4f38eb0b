// Opens a Hugging Face checkpoint directory: validated spec, every expected tensor
// present with its expected shape and a supported dtype, and the tokenizer.

import { existsSync, statSync } from 'node:fs';
import { readModelSpec } from './hf-config.js';
import { SafetensorsCheckpoint } from './safetensors.js';
import type { ModelSpec } from './spec.js';
import { checkpointTensors } from './tensor-names.js';
import { MoeTokenizer } from './tokenizer.js';

export class CheckpointError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CheckpointError';
  }
}

const FLOAT_DTYPES = new Set(['F32', 'F16', 'BF16']);

/** Checks that the checkpoint holds exactly the tensors the spec needs, with their shapes. */
export function validateTensors(spec: ModelSpec, ckpt: SafetensorsCheckpoint, dir: string): void {
  for (const t of checkpointTensors(spec)) {
    if (!ckpt.has(t.name)) throw new CheckpointError(`${dir}: missing tensor ${t.name} (expected shape [${t.shape}])`);
    const info = ckpt.info(t.name);
    if (info.shape.length !== t.shape.length || info.shape.some((d, i) => d !== t.shape[i])) {
      throw new CheckpointError(`${dir}: tensor ${t.name} has shape [${info.shape}], config.json implies [${t.shape}]`);
    }
    if (!FLOAT_DTYPES.has(info.dtype)) {
      throw new CheckpointError(`${dir}: tensor ${t.name} has dtype ${info.dtype}; supported: F32, F16, BF16`);
    }
  }
}

export interface OpenedModel {
  dir: string;
  spec: ModelSpec;
  weights: SafetensorsCheckpoint;
  tokenizer: MoeTokenizer;
  close(): void;
}

export async function openModel(dir: string): Promise<OpenedModel> {
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new CheckpointError(`model directory not found: ${dir}`);
  const spec = readModelSpec(dir);
  const weights = SafetensorsCheckpoint.openDir(dir);
  try {
    validateTensors(spec, weights, dir);
    const tokenizer = await MoeTokenizer.load(dir);
    if (tokenizer.vocabSize > spec.vocabSize) {
      throw new CheckpointError(`${dir}: the tokenizer has ${tokenizer.vocabSize} ids but vocab_size is ${spec.vocabSize}`);
    }
    return { dir, spec, weights, tokenizer, close: () => weights.close() };
  } catch (e) {
    weights.close();
    throw e;
  }
}
