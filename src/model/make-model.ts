// Writes a complete Hugging Face checkpoint directory with deterministic random
// weights: config.json, safetensors (single or sharded with an index), tokenizer.json,
// tokenizer_config.json and generation_config.json.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { hfConfigFromSpec } from './hf-config.js';
import { presetShape } from './presets.js';
import { hashSeed, Rng } from './prng.js';
import { writeSafetensors } from './safetensors-writer.js';
import type { Architecture, ModelSpec } from './spec.js';
import { checkpointTensors, type TensorShape } from './tensor-names.js';
import { buildTokenizerFiles } from './tokenizer-files.js';

export type StoredDtype = 'f32' | 'f16' | 'bf16';

export interface MakeModelOptions {
  arch: Architecture;
  out: string;
  preset?: string;
  seed?: number;
  dtype?: StoredDtype;
  shards?: number;
  /** Overrides of preset fields, for tests that need an odd shape. */
  overrides?: Partial<ModelSpec>;
}

const ST_DTYPE = { f32: 'F32', f16: 'F16', bf16: 'BF16' } as const;
const TORCH_DTYPE = { f32: 'float32', f16: 'float16', bf16: 'bfloat16' } as const;

/** The spec a preset gives for an architecture, with the generated tokenizer's ids. */
export function specForPreset(arch: Architecture, preset = 'tiny', overrides: Partial<ModelSpec> = {}) {
  const { bpeMerges, vocabSize, ...shape } = presetShape(preset, arch);
  const tok = buildTokenizerFiles(arch, { numMerges: bpeMerges });
  if (vocabSize !== undefined && vocabSize < tok.size) throw new Error(`preset ${preset}: vocabSize ${vocabSize} is below the tokenizer's ${tok.size} ids`);
  const spec: ModelSpec = {
    arch,
    ...shape,
    // Real checkpoints pad the embedding matrix past the tokenizer's ids.
    vocabSize: vocabSize ?? Math.ceil(tok.size / 64) * 64,
    gating: arch === 'mixtral' || arch === 'qwen3_moe' ? 'softmax_topk_renorm' : 'softmax_topk',
    qkNorm: arch === 'qwen3_moe' ? 'per_head' : arch === 'olmoe' ? 'full' : 'none',
    qkvBias: arch === 'qwen2_moe',
    bosTokenId: tok.specialTokens.bos,
    eosTokenIds: tok.specialTokens.eos,
    ...overrides,
  };
  return { spec, tok };
}

/**
 * Initial values scaled as a real initialisation: linear weights uniform with variance
 * 1/fan_in (the shape of PyTorch's default Kaiming-uniform init) so each projection
 * preserves the activations' scale through every layer; norm weights near 1 (not exactly
 * 1, so that a forgotten norm weight shows in tests); the LM head a little wider so
 * next-token distributions are peaked as a trained model's are.
 */
export function initTensor(t: TensorShape, seed: number, into?: Float32Array): Float32Array {
  const n = t.shape.reduce((a, b) => a * b, 1);
  if (into && into.length < n) throw new Error(`initTensor: ${t.name} needs ${n} values, the buffer holds ${into.length}`);
  // Every fill below writes all n values, so a reused buffer needs no clearing.
  const out = into ? into.subarray(0, n) : new Float32Array(n);
  const rng = new Rng(hashSeed(seed, t.name));
  switch (t.role) {
    case 'embed':
      return rng.fillUniform(out, 0, 1);
    case 'norm':
      return rng.fillNormal(out, 1, 0.1);
    case 'bias':
      return rng.fillNormal(out, 0, 0.1);
    case 'lm_head':
      return rng.fillUniform(out, 0, 4 / Math.sqrt(t.fanIn));
    case 'linear':
    case 'router':
    case 'expert':
      return rng.fillUniform(out, 0, 1 / Math.sqrt(t.fanIn));
  }
}

/** Splits tensors into `shards` groups of about equal bytes, keeping order. */
function shardTensors(tensors: TensorShape[], shards: number, bytesPer: number): TensorShape[][] {
  const total = tensors.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1) * bytesPer, 0);
  const target = total / shards;
  const groups: TensorShape[][] = [[]];
  let acc = 0;
  for (const t of tensors) {
    const bytes = t.shape.reduce((x, y) => x * y, 1) * bytesPer;
    const cur = groups[groups.length - 1];
    if (cur.length > 0 && acc + bytes / 2 > target * groups.length && groups.length < shards) {
      groups.push([t]);
    } else {
      cur.push(t);
    }
    acc += bytes;
  }
  return groups;
}

export function makeModel(opts: MakeModelOptions): ModelSpec {
  const dtype = opts.dtype ?? 'f32';
  const seed = opts.seed ?? 0;
  const shards = opts.shards ?? 1;
  if (!Number.isInteger(shards) || shards < 1) throw new Error(`--shards must be a positive integer, got ${opts.shards}`);
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error(`--seed must be an integer in [0, 2^32), got ${opts.seed}`);
  const { spec, tok } = specForPreset(opts.arch, opts.preset ?? 'tiny', opts.overrides);
  mkdirSync(opts.out, { recursive: true });

  const tensors = checkpointTensors(spec);
  const bytesPer = dtype === 'f32' ? 4 : 2;
  const stDtype = ST_DTYPE[dtype];
  const byName = new Map(tensors.map((t) => [t.name, t]));
  // One buffer for every tensor's values (writeSafetensors writes each before it asks for
  // the next): fresh memory is slow to touch on some virtual machines.
  const largest = tensors.reduce((a, t) => Math.max(a, t.shape.reduce((x, y) => x * y, 1)), 0);
  const scratch = new Float32Array(largest);
  const fill = (name: string) => initTensor(byName.get(name)!, seed, scratch);
  const entries = (ts: TensorShape[]) => ts.map((t) => ({ name: t.name, dtype: stDtype, shape: t.shape }));
  const meta = { format: 'pt' };

  if (shards === 1) {
    writeSafetensors(join(opts.out, 'model.safetensors'), entries(tensors), fill, meta);
  } else {
    const groups = shardTensors(tensors, shards, bytesPer);
    const weightMap: Record<string, string> = {};
    let total = 0;
    groups.forEach((g, i) => {
      const file = `model-${String(i + 1).padStart(5, '0')}-of-${String(groups.length).padStart(5, '0')}.safetensors`;
      writeSafetensors(join(opts.out, file), entries(g), fill, meta);
      for (const t of g) {
        weightMap[t.name] = file;
        total += t.shape.reduce((a, b) => a * b, 1) * bytesPer;
      }
    });
    writeJson(join(opts.out, 'model.safetensors.index.json'), { metadata: { total_size: total }, weight_map: weightMap });
  }

  writeJson(join(opts.out, 'config.json'), hfConfigFromSpec(spec, TORCH_DTYPE[dtype]));
  writeJson(join(opts.out, 'generation_config.json'), {
    bos_token_id: spec.bosTokenId,
    eos_token_id: spec.eosTokenIds.length === 1 ? spec.eosTokenIds[0] : spec.eosTokenIds,
    do_sample: true,
    temperature: 0.7,
    top_p: 0.8,
    top_k: 20,
    transformers_version: '4.51.0',
  });
  writeJson(join(opts.out, 'tokenizer.json'), tok.tokenizerJson);
  writeJson(join(opts.out, 'tokenizer_config.json'), tok.tokenizerConfig);
  return spec;
}

function writeJson(path: string, value: unknown): void {
  writeFileSync(path, JSON.stringify(value, null, 2) + '\n');
}
