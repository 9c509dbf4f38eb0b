// llama.cpp as an independent oracle: tiny generated checkpoints of every architecture are
// exported to GGUF, run by llama.cpp (node-llama-cpp's prebuilt CPU binaries) and their
// logits compared with our reference forward pass. Also a unit test of the GGUF writer
// that parses files back with a minimal reader written here.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import type { ControlledEvaluateInputItem, Llama, Token } from 'node-llama-cpp';
import { openModel } from '../src/model/checkpoint.js';
import { exportGguf, permuteRotaryRows, type GgufExportType } from '../src/model/gguf-export.js';
import { GgmlType, GgufValueType, GgufWriter, f32ToF16Bits, quantizeQ4_0, quantizeQ8_0 } from '../src/model/gguf-writer.js';
import { ReferenceModel } from '../src/model/reference.js';
import { ARCHITECTURES, type Architecture, type ModelSpec } from '../src/model/spec.js';
import { checkpointTensors, layerNames } from '../src/model/tensor-names.js';
import { tempDir, writeModel } from './helpers/models.js';

// ---------------------------------------------------------------------------------
// A minimal GGUF reader, independent of the writer's code.

interface ReadKv {
  type: number;
  elementType?: number;
  value: unknown;
}
interface ReadTensor {
  name: string;
  ne: number[];
  type: number;
  offset: number;
}
interface ReadGguf {
  version: number;
  tensorCount: number;
  kvCount: number;
  kv: Map<string, ReadKv>;
  tensors: ReadTensor[];
  alignment: number;
  dataOffset: number;
  buf: Buffer;
}

function readGguf(file: string): ReadGguf {
  const buf = readFileSync(file);
  let p = 0;
  const u32 = () => ((p += 4), buf.readUInt32LE(p - 4));
  const u64 = () => ((p += 8), Number(buf.readBigUInt64LE(p - 8)));
  const str = () => {
    const n = u64();
    p += n;
    return buf.toString('utf8', p - n, p);
  };
  const scalar = (type: number): unknown => {
    switch (type) {
      case 0: return ((p += 1), buf.readUInt8(p - 1));
      case 1: return ((p += 1), buf.readInt8(p - 1));
      case 2: return ((p += 2), buf.readUInt16LE(p - 2));
      case 3: return ((p += 2), buf.readInt16LE(p - 2));
      case 4: return u32();
      case 5: return ((p += 4), buf.readInt32LE(p - 4));
      case 6: return ((p += 4), buf.readFloatLE(p - 4));
      case 7: return ((p += 1), buf.readUInt8(p - 1) !== 0);
      case 8: return str();
      case 10: return ((p += 8), buf.readBigUInt64LE(p - 8));
      case 11: return ((p += 8), buf.readBigInt64LE(p - 8));
      case 12: return ((p += 8), buf.readDoubleLE(p - 8));
      default: throw new Error(`bad value type ${type} at ${p}`);
    }
  };
  if (buf.toString('latin1', 0, 4) !== 'GGUF') throw new Error('bad magic');
  p = 4;
  const version = u32();
  const tensorCount = u64();
  const kvCount = u64();
  const kv = new Map<string, ReadKv>();
  for (let i = 0; i < kvCount; i++) {
    const key = str();
    const type = u32();
    if (type === 9) {
      const elementType = u32();
      const n = u64();
      const value = Array.from({ length: n }, () => scalar(elementType));
      kv.set(key, { type, elementType, value });
    } else {
      kv.set(key, { type, value: scalar(type) });
    }
  }
  const tensors: ReadTensor[] = [];
  for (let i = 0; i < tensorCount; i++) {
    const name = str();
    const nd = u32();
    const ne = Array.from({ length: nd }, () => u64());
    tensors.push({ name, ne, type: u32(), offset: u64() });
  }
  const alignment = kv.has('general.alignment') ? (kv.get('general.alignment')!.value as number) : 32;
  const dataOffset = Math.ceil(p / alignment) * alignment;
  return { version, tensorCount, kvCount, kv, tensors, alignment, dataOffset, buf };
}

function halfToNumber(h: number): number {
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  const s = h & 0x8000 ? -1 : 1;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** Decodes a tensor's data as float32 with this file's own reading of the ggml block layouts. */
function tensorValues(g: ReadGguf, tn: ReadTensor): Float32Array {
  const n = tn.ne.reduce((a, b) => a * b, 1);
  const base = g.dataOffset + tn.offset;
  const out = new Float32Array(n);
  const b = g.buf;
  if (tn.type === 0) for (let i = 0; i < n; i++) out[i] = b.readFloatLE(base + 4 * i);
  else if (tn.type === 1) for (let i = 0; i < n; i++) out[i] = halfToNumber(b.readUInt16LE(base + 2 * i));
  else if (tn.type === 8) {
    for (let blk = 0; blk < n / 32; blk++) {
      const o = base + blk * 34;
      const d = halfToNumber(b.readUInt16LE(o));
      for (let j = 0; j < 32; j++) out[blk * 32 + j] = d * b.readInt8(o + 2 + j);
    }
  } else if (tn.type === 2) {
    for (let blk = 0; blk < n / 32; blk++) {
      const o = base + blk * 18;
      const d = halfToNumber(b.readUInt16LE(o));
      for (let j = 0; j < 16; j++) {
        out[blk * 32 + j] = d * ((b[o + 2 + j] & 15) - 8);
        out[blk * 32 + 16 + j] = d * ((b[o + 2 + j] >> 4) - 8);
      }
    }
  } else throw new Error(`type ${tn.type}`);
  return out;
}

function randomValues(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s / 2 ** 32) * 2 - 1) * scale;
  }
  return out;
}

// ---------------------------------------------------------------------------------

t.test('gguf writer: header, metadata, tensor infos, alignment and data read back', async (t) => {
  const dir = tempDir(t);
  const f32 = randomValues(15, 1);
  const f16 = randomValues(8, 2, 3);
  const q8 = randomValues(128, 3, 2);
  const q4 = randomValues(96, 4, 0.5);
  const vec = randomValues(7, 5);
  const strings = ['a', 'Ġhello', '<|im_end|>', '', 'ünïcødé'];

  for (const alignment of [32, 64]) {
    const w = new GgufWriter(alignment === 32 ? {} : { alignment });
    w.addString('general.architecture', 'test');
    w.add('k.u8', { type: GgufValueType.UINT8, value: 255 });
    w.add('k.i8', { type: GgufValueType.INT8, value: -128 });
    w.add('k.u16', { type: GgufValueType.UINT16, value: 65535 });
    w.add('k.i16', { type: GgufValueType.INT16, value: -32768 });
    w.addUint32('k.u32', 4294967295);
    w.addInt32('k.i32', -2147483648);
    w.addFloat32('k.f32', 1e-6);
    w.addBool('k.bool', true);
    w.addUint64('k.u64', 2n ** 63n + 5n);
    w.add('k.i64', { type: GgufValueType.INT64, value: -(2n ** 40n) });
    w.add('k.f64', { type: GgufValueType.FLOAT64, value: Math.PI });
    w.addArray('k.strings', GgufValueType.STRING, strings);
    w.addArray('k.ints', GgufValueType.INT32, [1, -2, 3]);
    w.addArray('k.empty', GgufValueType.FLOAT32, []);
    w.addTensor('t.f32', [3, 5], GgmlType.F32, f32);
    w.addTensor('t.f16', [2, 4], GgmlType.F16, () => f16);
    w.addTensor('t.q8', [2, 64], GgmlType.Q8_0, () => q8);
    w.addTensor('t.q4', [3, 32], GgmlType.Q4_0, q4);
    w.addTensor('t.vec', [7], GgmlType.F32, vec);
    const file = join(dir, `a${alignment}.gguf`);
    const summary = w.write(file);

    const g = readGguf(file);
    t.equal(g.buf.readUInt32LE(0), 0x46554747, 'magic "GGUF"');
    t.equal(g.version, 3);
    t.equal(g.tensorCount, 5);
    t.equal(g.kvCount, 15 + (alignment === 32 ? 0 : 1));
    t.equal(g.alignment, alignment);
    if (alignment !== 32) t.same(g.kv.get('general.alignment'), { type: 4, value: alignment }, 'non-default alignment recorded as u32');
    t.equal(g.kv.get('general.architecture')!.value, 'test');
    t.equal(g.kv.get('k.u8')!.value, 255);
    t.equal(g.kv.get('k.i8')!.value, -128);
    t.equal(g.kv.get('k.u16')!.value, 65535);
    t.equal(g.kv.get('k.i16')!.value, -32768);
    t.equal(g.kv.get('k.u32')!.value, 4294967295);
    t.equal(g.kv.get('k.i32')!.value, -2147483648);
    t.equal(g.kv.get('k.f32')!.value, Math.fround(1e-6));
    t.equal(g.kv.get('k.bool')!.value, true);
    t.equal(g.kv.get('k.u64')!.value, 2n ** 63n + 5n);
    t.equal(g.kv.get('k.i64')!.value, -(2n ** 40n));
    t.equal(g.kv.get('k.f64')!.value, Math.PI);
    t.same(g.kv.get('k.strings'), { type: 9, elementType: 8, value: strings });
    t.same(g.kv.get('k.ints'), { type: 9, elementType: 5, value: [1, -2, 3] });
    t.same(g.kv.get('k.empty'), { type: 9, elementType: 6, value: [] });

    t.same(
      g.tensors.map((x) => [x.name, x.ne, x.type]),
      [
        ['t.f32', [5, 3], 0],
        ['t.f16', [4, 2], 1],
        ['t.q8', [64, 2], 8],
        ['t.q4', [32, 3], 2],
        ['t.vec', [7], 0],
      ],
      'ggml dims are the row-major shape reversed',
    );
    t.equal(g.dataOffset, summary.dataOffset);
    t.equal(g.dataOffset % alignment, 0, 'data section aligned');
    const sizes = [60, 16, 4 * 34, 3 * 18, 28];
    let expect = 0;
    g.tensors.forEach((x, i) => {
      t.equal(x.offset % alignment, 0, `${x.name} offset aligned`);
      t.equal(x.offset, expect, `${x.name} follows the previous tensor plus padding`);
      expect += Math.ceil(sizes[i] / alignment) * alignment;
    });
    t.equal(g.buf.length, g.dataOffset + expect, 'file ends after the padded last tensor');
    t.equal(summary.fileBytes, g.buf.length);

    t.same(tensorValues(g, g.tensors[0]), f32, 'F32 exact');
    t.same(tensorValues(g, g.tensors[4]), vec, 'F32 vector exact');
    const h = tensorValues(g, g.tensors[1]);
    f16.forEach((x, i) => t.ok(Math.abs(h[i] - x) <= Math.abs(x) * 2 ** -11 + 1e-7, `F16 ${x} → ${h[i]}`));
    const d8 = tensorValues(g, g.tensors[2]);
    let maxErr8 = 0;
    for (let b = 0; b < 4; b++) {
      const blk = q8.subarray(b * 32, b * 32 + 32);
      const amax = Math.max(...blk.map(Math.abs));
      for (let j = 0; j < 32; j++) maxErr8 = Math.max(maxErr8, Math.abs(d8[b * 32 + j] - blk[j]) / amax);
    }
    t.ok(maxErr8 <= 0.5 / 127 + 1e-3, `Q8_0 error within half a step (${maxErr8.toExponential(2)} of the block's max)`);
    const d4 = tensorValues(g, g.tensors[3]);
    let maxErr4 = 0;
    for (let b = 0; b < 3; b++) {
      const blk = q4.subarray(b * 32, b * 32 + 32);
      const amax = Math.max(...blk.map(Math.abs));
      for (let j = 0; j < 32; j++) maxErr4 = Math.max(maxErr4, Math.abs(d4[b * 32 + j] - blk[j]) / amax);
    }
    t.ok(maxErr4 <= 1 / 8 + 1e-3, `Q4_0 error within a step (${maxErr4.toExponential(2)} of the block's max)`);
  }

  // Exact block layouts on hand-made values.
  const ramp = Float32Array.from({ length: 32 }, (_, j) => (j - 16) / 2); // -8 .. 7.5
  const q8b = quantizeQ8_0(ramp);
  t.equal(q8b.length, 34);
  t.equal(q8b[0] | (q8b[1] << 8), f32ToF16Bits(8 / 127), 'Q8_0 d = max|x| / 127 as f16');
  t.equal(new Int8Array(q8b.buffer, 2, 32)[0], -127, 'Q8_0 q[0] = round(-8 / d)');
  t.equal(new Int8Array(q8b.buffer, 2, 32)[31], Math.round(7.5 / (8 / 127)));
  const q4b = quantizeQ4_0(ramp);
  t.equal(q4b.length, 18);
  t.equal(q4b[0] | (q4b[1] << 8), f32ToF16Bits(1), 'Q4_0 d = (value of largest magnitude) / -8 = -8 / -8');
  // x / d + 8.5 truncated: element j → j/2 + 0.5 → ..., low nibble = element j, high = j + 16.
  t.equal(q4b[2] & 15, 0, 'Q4_0 byte 0 low nibble: element 0 (-8 → 0)');
  t.equal(q4b[2] >> 4, 8, 'Q4_0 byte 0 high nibble: element 16 (0 → 8)');
  t.equal(q4b[17] >> 4, 15, 'Q4_0 byte 15 high nibble: element 31 (7.5 → 15)');

  t.equal(f32ToF16Bits(1), 0x3c00);
  t.equal(f32ToF16Bits(-2), 0xc000);
  t.equal(f32ToF16Bits(65504), 0x7bff);
  t.equal(f32ToF16Bits(65520), 0x7c00, 'rounds to +inf past the largest half');
  t.equal(f32ToF16Bits(0.1), 0x2e66);
  t.equal(f32ToF16Bits(6e-8), 0x0001, 'smallest subnormal');
  t.equal(f32ToF16Bits(1e-8), 0x0000);
  t.equal(f32ToF16Bits(1 + 2 ** -11), 0x3c00, 'tie rounds to even');
  t.equal(f32ToF16Bits(NaN) & 0x7c00, 0x7c00);
  t.not(f32ToF16Bits(NaN) & 0x3ff, 0);

  const w = new GgufWriter();
  w.addUint32('x', 1);
  t.throws(() => w.addUint32('x', 2), /duplicate metadata key/);
  t.throws(() => w.add('y', { type: GgufValueType.UINT8, value: 256 }), /outside the range/);
  t.throws(() => w.addTensor('q', [2, 30], GgmlType.Q8_0, new Float32Array(60)), /multiple of 32/);
  t.throws(() => new GgufWriter({ alignment: 12 }), /multiple of 8/);
});

// ---------------------------------------------------------------------------------
// The export's metadata and tensor layout, read back (no llama.cpp needed).

t.test('export-gguf: metadata, tokenizer and tensors as llama.cpp names them', async (t) => {
  const dir = tempDir(t);
  for (const arch of ['qwen2_moe', 'qwen3_moe', 'mixtral'] as const) {
    const model = writeModel(t, { arch, preset: 'tiny', seed: 3, dtype: 'f32' });
    const file = join(dir, `${arch}.gguf`);
    const r = await exportGguf(model, file, arch === 'mixtral' ? 'f32' : 'q8_0');
    t.same(r.warnings, [], `${arch}: no semantic mismatch with llama.cpp`);
    const g = readGguf(file);
    const m = await openModel(model);
    t.teardown(() => m.close());
    const s = m.spec;
    const a = g.kv.get('general.architecture')!.value as string;
    t.equal(a, { qwen2_moe: 'qwen2moe', qwen3_moe: 'qwen3moe', mixtral: 'llama' }[arch]);
    const num = (k: string) => g.kv.get(`${a}.${k}`)?.value;
    t.equal(num('embedding_length'), s.hiddenSize);
    t.equal(num('block_count'), s.numLayers);
    t.equal(num('attention.head_count'), s.numHeads);
    t.equal(num('attention.head_count_kv'), s.numKvHeads);
    t.equal(num('attention.key_length'), s.headDim);
    t.equal(num('expert_count'), s.numExperts);
    t.equal(num('expert_used_count'), s.topK);
    t.equal(num('expert_feed_forward_length'), s.expertIntermediateSize);
    t.equal(num('rope.freq_base'), Math.fround(s.ropeTheta));
    t.equal(num('attention.layer_norm_rms_epsilon'), Math.fround(s.rmsNormEps));
    if (arch === 'qwen2_moe') t.equal(num('expert_shared_feed_forward_length'), s.sharedExpertIntermediateSize);

    const tokens = g.kv.get('tokenizer.ggml.tokens')!.value as string[];
    const types = g.kv.get('tokenizer.ggml.token_type')!.value as number[];
    t.equal(tokens.length, s.vocabSize, 'token list padded to the embedding rows');
    t.equal(types.length, s.vocabSize);
    t.equal(g.kv.get('tokenizer.ggml.model')!.value, 'gpt2');
    t.equal(tokens[s.vocabSize - 1], `[PAD${s.vocabSize - 1}]`);
    t.equal(types[s.vocabSize - 1], 5, 'filler tokens are UNUSED');
    t.equal(tokens[m.tokenizer.vocabSize - 1], m.tokenizer.idToToken(m.tokenizer.vocabSize - 1));
    t.equal(types[s.eosTokenIds[0]], 3, 'eos is a CONTROL token');
    t.equal(g.kv.get('tokenizer.ggml.eos_token_id')!.value, s.eosTokenIds[0]);
    t.equal(types[65], 1, 'byte tokens are NORMAL');
    const merges = g.kv.get('tokenizer.ggml.merges')!.value as string[];
    const tj = JSON.parse(readFileSync(join(model, 'tokenizer.json'), 'utf8')) as { model: { merges: string[] } };
    t.same(merges, tj.model.merges);

    const byName = new Map(g.tensors.map((x) => [x.name, x]));
    const w = s.expertIntermediateSize;
    const e0 = byName.get('blk.0.ffn_gate_exps.weight')!;
    t.same(e0.ne, [s.hiddenSize, w, s.numExperts], 'stacked experts: ne = [hidden, width, experts]');
    t.same(byName.get('blk.1.ffn_down_exps.weight')!.ne, [w, s.hiddenSize, s.numExperts]);
    t.equal(byName.get('blk.0.ffn_gate_inp.weight')!.type, 0, 'router stays F32');
    t.equal(byName.get('blk.0.attn_norm.weight')!.type, 0, 'norm stays F32');
    t.equal(byName.get('output_norm.weight')!.type, 0);
    if (arch === 'qwen2_moe') {
      t.same(byName.get('blk.0.ffn_gate_inp_shexp.weight')!.ne, [s.hiddenSize], 'shared-expert gate is a vector');
      t.equal(byName.get('blk.0.attn_q.bias')!.type, 0, 'bias stays F32');
      t.equal(byName.get('blk.0.ffn_up_shexp.weight')!.type, 8);
    }
    if (arch === 'qwen3_moe') {
      t.same(byName.get('blk.0.attn_q_norm.weight')!.ne, [s.headDim], 'per-head q norm');
      t.equal(e0.type, 8, 'experts quantized to Q8_0');
      t.equal(byName.get('token_embd.weight')!.type, 8);
    }
    if (arch === 'mixtral') {
      // Expert 3's up matrix sits at slice 3 of the stacked tensor.
      const ln = layerNames(s, 1);
      const up = tensorValues(g, byName.get('blk.1.ffn_up_exps.weight')!);
      const hf = m.weights.float32(ln.expert(3).up);
      t.same(up.subarray(3 * hf.length, 4 * hf.length), hf, 'experts stacked in id order');
      // q rows: within each head, HF rows (i, i + d/2) become rows (2i, 2i + 1).
      const q = tensorValues(g, byName.get('blk.1.attn_q.weight')!);
      const hq = m.weights.float32(ln.q);
      const h = s.hiddenSize;
      const d = s.headDim;
      const row = (x: Float32Array, r: number) => Array.from(x.subarray(r * h, (r + 1) * h));
      t.same(row(q, d + 1), row(hq, d + d / 2), 'head 1: GGUF row 1 = HF row d/2');
      t.same(row(q, d + 4), row(hq, d + 2), 'head 1: GGUF row 4 = HF row 2');
      t.same(q, permuteRotaryRows(hq, s.numHeads, d, h));
      const k = tensorValues(g, byName.get('blk.0.attn_k.weight')!);
      t.same(k, permuteRotaryRows(m.weights.float32(layerNames(s, 0).k), s.numKvHeads, d, h), 'k permuted with the kv heads');
    }
  }
});

// ---------------------------------------------------------------------------------
// llama.cpp as the oracle

let llama: Llama | null = null;
let skip: string | false = false;
try {
  const { getLlama, LlamaLogLevel } = await import('node-llama-cpp');
  llama = await getLlama({ gpu: false, build: 'never', logLevel: LlamaLogLevel.error, progressLogs: false });
} catch (e) {
  skip = `node-llama-cpp cannot run here: ${(e as Error).message.split('\n')[0]}`;
}
t.teardown(async () => {
  await llama?.dispose();
});

/** A fixed sequence of 16 ids below every tokenizer's size (our tokenizers have > 1000 ids). */
const TOKENS = [11, 48, 85, 122, 159, 196, 233, 270, 7, 44, 81, 118, 155, 192, 229, 266];

/** llama.cpp's logits (tokens × vocab) for every position of TOKENS. */
async function llamaCppLogits(file: string, vocab: number): Promise<Float32Array> {
  const model = await llama!.loadModel({ modelPath: file, gpuLayers: 0 });
  try {
    const ctx = await model.createContext({
      contextSize: 64,
      batchSize: 64,
      threads: 2,
      flashAttention: false,
      // An F32 KV cache, so the f32 comparison is not limited by F16 keys and values.
      experimentalKvCacheKeyType: 'F32',
      experimentalKvCacheValueType: 'F32',
    });
    try {
      const input: ControlledEvaluateInputItem[] = TOKENS.map((tok) => [tok as Token, { generateNext: { logits: true } }]);
      const res = await ctx.getSequence().controlledEvaluate(input);
      const out = new Float32Array(TOKENS.length * vocab);
      for (let p = 0; p < TOKENS.length; p++) {
        const lg = res[p]?.next.logits;
        if (!lg || lg.size !== vocab) throw new Error(`position ${p}: expected ${vocab} logits, got ${lg?.size}`);
        for (const [id, v] of lg) out[p * vocab + (id as number)] = v;
      }
      return out;
    } finally {
      await ctx.dispose();
    }
  } finally {
    await model.dispose();
  }
}

/** llama.cpp's tokenization (no bos, special-token text recognised) of each text. */
async function llamaCppTokenize(file: string, texts: string[]): Promise<number[][]> {
  const model = await llama!.loadModel({ modelPath: file, gpuLayers: 0 });
  try {
    return texts.map((text) => Array.from(model.tokenize(text, true), (id) => id as number));
  } finally {
    await model.dispose();
  }
}

const TEXTS = ["Hello world, this is 123 test.", "The quick brown fox's tail\n\n  jumps!", 'naïve café — 2024-01-02', '<|im_end|> [INST] <|endoftext|>'];

interface Comparison {
  /** max |ours − llama.cpp| / max |ours| per position. */
  rel: number[];
  maxRel: number;
  medianRel: number;
  argmaxAgree: number;
}

function compare(ours: Float32Array, theirs: Float32Array, vocab: number): Comparison {
  const rel: number[] = [];
  let argmaxAgree = 0;
  for (let p = 0; p < TOKENS.length; p++) {
    let err = 0;
    let mag = 0;
    let am = 0;
    let bm = 0;
    for (let v = 0; v < vocab; v++) {
      const a = ours[p * vocab + v];
      const b = theirs[p * vocab + v];
      err = Math.max(err, Math.abs(a - b));
      mag = Math.max(mag, Math.abs(a));
      if (a > ours[p * vocab + am]) am = v;
      if (b > theirs[p * vocab + bm]) bm = v;
    }
    rel.push(err / mag);
    if (am === bm) argmaxAgree++;
  }
  const sorted = [...rel].sort((x, y) => x - y);
  return { rel, maxRel: sorted[sorted.length - 1], medianRel: (sorted[7] + sorted[8]) / 2, argmaxAgree };
}

const fmt = (x: number) => x.toExponential(2);

/**
 * Smallest gap, over layers, between the k-th and (k+1)-th largest router logits of each
 * position: where it is tiny, a small perturbation of the activations flips an expert.
 */
function routerMargins(ref: ReferenceModel, tokens: number[]): number[] {
  const k = ref.spec.topK;
  const margins = new Array<number>(tokens.length).fill(Infinity);
  ref.forward(tokens, ref.newCache(), {
    onRouterLogits: (_layer, t, logits) => {
      const sorted = Array.from(logits).sort((p, q) => q - p);
      margins[t] = Math.min(margins[t], sorted[k - 1] - sorted[k]);
    },
  });
  return margins;
}

/**
 * The reference model of a checkpoint; with `roundTrip`, the matrices llama.cpp stores
 * quantized go through the same quantization (norms, biases, routers stay exact).
 */
async function reference(
  dir: string,
  roundTrip?: (x: Float32Array, expert: boolean) => Float32Array,
): Promise<{ spec: ModelSpec; logits: Float32Array; margins: number[] }> {
  const m = await openModel(dir);
  try {
    const roles = new Map(checkpointTensors(m.spec).map((x) => [x.name, x.role]));
    const kept = new Set(['norm', 'bias', 'router']);
    const ref = ReferenceModel.fromSource(m.spec, (name) => {
      const x = Float32Array.from(m.weights.float32(name));
      if (!roundTrip || kept.has(roles.get(name)!) || name.endsWith('shared_expert_gate.weight')) return x;
      return roundTrip(x, roles.get(name) === 'expert' || name.includes('.shared_expert.'));
    });
    return { spec: m.spec, logits: ref.forward(TOKENS, ref.newCache()), margins: routerMargins(ref, TOKENS) };
  } finally {
    m.close();
  }
}

/** The export's rounding: q4_0 holds the experts in Q4_0 and the other matrices in Q8_0. */
function dequant(type: 'q8_0' | 'q4_0'): (x: Float32Array, expert: boolean) => Float32Array {
  // Through a GGUF file would be circular with the writer; decode with this file's reader layout instead.
  return (x, expert) => {
    const q4 = type === 'q4_0' && expert;
    const bytes = q4 ? quantizeQ4_0(x) : quantizeQ8_0(x);
    const g = { buf: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), dataOffset: 0 } as ReadGguf;
    return tensorValues(g, { name: '', ne: [x.length], type: q4 ? 2 : 8, offset: 0 });
  };
}

// Tolerances, relative to the largest |logit| of a position:
// - f32: 1e-4 at every position (llama.cpp's f32 kernels against our float64-accumulating
//   reference; the observed error is a few 1e-7), and the same argmax everywhere.
// - f16: median over positions <= 5e-3, argmax on >= 14 of 16 (observed about 5e-4).
// - q8_0 against the exact reference: median over positions <= 5e-2 and the same argmax on
//   >= 12 of 16 positions. The maximum is only reported: where a token's router logits are
//   nearly tied, quantization error flips an expert and that position moves a lot.
// - q8_0 / q4_0 against the reference run on the same quantized weights (what remains is
//   llama.cpp quantizing activations to 8 bits in its dot products; a wrong block layout
//   would be far off): median <= 2.5e-2, and max <= 4e-2 over the positions whose router
//   logits keep a top-k margin >= 0.02 in every layer (outliers are allowed only at
//   near-ties, where a ~1% activation error can swap experts), argmax on >= 12 of 16.
const F32_TOL = 1e-4;
const F16_MEDIAN_TOL = 5e-3;
const Q8_MEDIAN_TOL = 5e-2;
const SAME_WEIGHTS_MEDIAN_TOL = 2.5e-2;
const SAME_WEIGHTS_MAX_TOL = 4e-2;
const CLEAR_MARGIN = 0.02;
const QUANT_ARGMAX_MIN = 12;

for (const arch of ARCHITECTURES as readonly Architecture[]) {
  t.test(`llama.cpp oracle: ${arch}`, { skip }, async (t) => {
    const model = writeModel(t, { arch, preset: 'tiny', seed: 11, dtype: 'f32' });
    const out = tempDir(t);
    const { spec, logits: exact } = await reference(model);
    const V = spec.vocabSize;

    const files: Partial<Record<GgufExportType, string>> = {};
    for (const type of ['f32', 'f16', 'q8_0', 'q4_0'] as const) {
      files[type] = join(out, `${arch}-${type}.gguf`);
      const r = await exportGguf(model, files[type]!, type);
      t.same(r.warnings, [], `${type} export: no semantic mismatch`);
    }

    // The tokenizer metadata: llama.cpp splits and merges text as our tokenizer does.
    const m = await openModel(model);
    const ours = TEXTS.map((text) => m.tokenizer.encode(text, { addSpecialTokens: false }));
    m.close();
    t.same(await llamaCppTokenize(files.f32!, TEXTS), ours, 'llama.cpp tokenizes text to the same ids');

    const f32 = compare(exact, await llamaCppLogits(files.f32!, V), V);
    t.comment(`${arch} f32: max rel error ${fmt(f32.maxRel)} (last position ${fmt(f32.rel[15])}), argmax agrees ${f32.argmaxAgree}/16`);
    t.ok(f32.maxRel <= F32_TOL, `f32: max rel error ${fmt(f32.maxRel)} <= ${F32_TOL} over all 16 positions`);
    t.equal(f32.argmaxAgree, 16, 'f32: argmax agrees at every position');

    const f16 = compare(exact, await llamaCppLogits(files.f16!, V), V);
    t.comment(`${arch} f16: median rel ${fmt(f16.medianRel)}, max ${fmt(f16.maxRel)}, argmax agrees ${f16.argmaxAgree}/16`);
    t.ok(f16.medianRel <= F16_MEDIAN_TOL, `f16: median rel error ${fmt(f16.medianRel)} <= ${F16_MEDIAN_TOL}`);
    t.ok(f16.argmaxAgree >= 14, `f16: argmax agrees on ${f16.argmaxAgree} >= 14 of 16 positions`);

    const q8Logits = await llamaCppLogits(files.q8_0!, V);
    const q8 = compare(exact, q8Logits, V);
    t.comment(`${arch} q8_0 vs reference: median rel ${fmt(q8.medianRel)}, max ${fmt(q8.maxRel)}, argmax agrees ${q8.argmaxAgree}/16`);
    t.ok(q8.medianRel <= Q8_MEDIAN_TOL, `q8_0: median rel error ${fmt(q8.medianRel)} <= ${Q8_MEDIAN_TOL}`);
    t.ok(q8.argmaxAgree >= QUANT_ARGMAX_MIN, `q8_0: argmax agrees on ${q8.argmaxAgree} >= ${QUANT_ARGMAX_MIN} of 16 positions`);

    for (const type of ['q8_0', 'q4_0'] as const) {
      const { logits: same, margins } = await reference(model, dequant(type));
      const c = compare(same, type === 'q8_0' ? q8Logits : await llamaCppLogits(files.q4_0!, V), V);
      const clear = c.rel.filter((_, p) => margins[p] >= CLEAR_MARGIN);
      const clearMax = Math.max(...clear);
      const outliers = c.rel
        .map((r, p) => [r, p] as const)
        .filter(([r]) => r > SAME_WEIGHTS_MAX_TOL)
        .map(([r, p]) => `position ${p}: ${fmt(r)} at router margin ${fmt(margins[p])}`);
      t.comment(
        `${arch} ${type} vs reference on the same quantized weights: median rel ${fmt(c.medianRel)}, max ${fmt(c.maxRel)}, ` +
          `max over ${clear.length} clear-routing positions ${fmt(clearMax)}, argmax agrees ${c.argmaxAgree}/16` +
          (outliers.length ? `; outliers (near-tied routing): ${outliers.join(', ')}` : ''),
      );
      t.ok(c.medianRel <= SAME_WEIGHTS_MEDIAN_TOL, `${type} block layout: median rel error ${fmt(c.medianRel)} <= ${SAME_WEIGHTS_MEDIAN_TOL}`);
      t.ok(clear.length >= 4, `${type}: ${clear.length} of 16 positions route with a clear margin`);
      t.ok(clearMax <= SAME_WEIGHTS_MAX_TOL, `${type}: max rel error ${fmt(clearMax)} <= ${SAME_WEIGHTS_MAX_TOL} where routing is not near a tie`);
      t.ok(c.argmaxAgree >= QUANT_ARGMAX_MIN, `${type}: argmax agrees on ${c.argmaxAgree} >= ${QUANT_ARGMAX_MIN} of 16 positions`);
    }
  });
}
