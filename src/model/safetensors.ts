// Reading safetensors checkpoints: one file, or a Hugging Face sharded directory
// (model.safetensors.index.json). Files are memory-mapped and validated by the native
// addon; tensors are handed out as zero-copy views into the mappings.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { markAsUntransferable } from 'node:worker_threads';
import { loadNative, type NativeTensorEntry, type SafetensorsOpenResult } from '../engine/native.js';

export type StDtype =
  | 'F64'
  | 'F32'
  | 'F16'
  | 'BF16'
  | 'I64'
  | 'I32'
  | 'I16'
  | 'I8'
  | 'U8'
  | 'BOOL'
  | 'F8_E4M3'
  | 'F8_E5M2';

/** Bytes per element of each dtype. */
export const ST_DTYPE_SIZE: Readonly<Record<StDtype, number>> = Object.freeze({
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
});

/**
 * A safetensors problem. `code` is stable: the native file checks (ST_IO,
 * ST_TRUNCATED, ST_HEADER_LENGTH, ST_HEADER_JSON, ST_BAD_ENTRY, ST_DTYPE,
 * ST_SHAPE_MISMATCH, ST_OFFSET_RANGE, ST_OVERLAP, ST_HOLE), ST_INDEX (sharded
 * directory / index problems), ST_NO_TENSOR (unknown name), ST_CONVERT (dtype not
 * convertible), ST_CLOSED (use after close).
 */
export class SafetensorsError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = 'SafetensorsError';
    this.code = code;
  }
}

export interface TensorInfo {
  name: string;
  dtype: string;
  shape: number[];
  /** Absolute path of the file holding the tensor. */
  file: string;
}

// ---- Scalar conversions (bit patterns as unsigned integers) ----------------------

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

function f32Bits(x: number): number {
  scratchF32[0] = x;
  return scratchU32[0];
}

/** float32 → bfloat16 bits, round to nearest even; NaN stays NaN (quiet), sign kept. */
export function f32ToBf16(x: number): number {
  const bits = f32Bits(x);
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) {
    return ((bits >>> 16) | 0x0040) & 0xffff;
  }
  const lsb = (bits >>> 16) & 1;
  // No overflow past 2^32: the largest non-NaN pattern is 0xff800000.
  return Math.floor((bits + 0x7fff + lsb) / 0x10000) & 0xffff;
}

/** bfloat16 bits → number (exact). */
export function bf16ToF32(h: number): number {
  scratchU32[0] = (h & 0xffff) << 16;
  return scratchF32[0];
}

/**
 * float32 (x is first rounded to float32) → IEEE binary16 bits, round to nearest
 * even; overflow → ±inf, results below the smallest subnormal → ±0, NaN → quiet NaN.
 */
export function f32ToF16(x: number): number {
  const bits = f32Bits(x);
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15; // biased half exponent
  if (e >= 31) return sign | 0x7c00;
  if (e >= 1) {
    let half = (e << 10) | (mant >>> 13);
    const rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest === 0x1000 && (half & 1) !== 0)) half += 1; // may carry into inf: correct
    return sign | half;
  }
  // Subnormal half (or zero). float32 subnormals (exp 0) are far below 2^-24.
  if (e < -10) return sign;
  const m = mant | 0x800000; // 24-bit significand
  const shift = 14 - e; // 14..24
  let half = m >>> shift;
  const rest = m & ((1 << shift) - 1);
  const halfway = 1 << (shift - 1);
  if (rest > halfway || (rest === halfway && (half & 1) !== 0)) half += 1; // may become the smallest normal
  return sign | half;
}

/** IEEE binary16 bits → number (exact). */
export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant !== 0 ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

let f16Table: Float32Array | undefined;
function f16ToF32Table(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16ToF32(h);
  }
  return f16Table;
}

// ---- Checkpoint ------------------------------------------------------------------

const LITTLE_ENDIAN = os.endianness() === 'LE';

interface Shard {
  file: string;
  open: SafetensorsOpenResult;
}

interface Entry {
  shard: Shard;
  tensor: NativeTensorEntry;
}

function rethrow(e: unknown): never {
  if (e instanceof SafetensorsError) throw e;
  if (e instanceof Error && typeof (e as { code?: unknown }).code === 'string') {
    throw new SafetensorsError((e as Error & { code: string }).code, e.message);
  }
  throw e;
}

function openShard(file: string): Shard {
  let open: SafetensorsOpenResult;
  try {
    open = loadNative().safetensorsOpen(file);
  } catch (e) {
    rethrow(e);
  }
  // A transferred copy would outlive close() and point at unmapped memory.
  markAsUntransferable(open.buffer);
  return { file, open };
}

/**
 * A validated, memory-mapped safetensors checkpoint (one file or a sharded directory).
 *
 * Views returned by bytes() and float32() may point into the read-only mapping:
 * never write to them (a write into a read-only page kills the process); copy first
 * (`.slice()`) when a mutable array is needed.
 */
export class SafetensorsCheckpoint {
  /** Merged `__metadata__` of all files (the first file wins on a repeated key). */
  readonly metadata: Readonly<Record<string, string>>;
  private readonly shards: Shard[];
  private readonly entries: Map<string, Entry>;
  private closed = false;

  private constructor(shards: Shard[], entries: Map<string, Entry>) {
    this.shards = shards;
    this.entries = entries;
    const metadata: Record<string, string> = {};
    for (const s of shards) {
      for (const [k, v] of Object.entries(s.open.metadata)) if (!(k in metadata)) metadata[k] = v;
    }
    this.metadata = Object.freeze(metadata);
  }

  /** Opens one .safetensors file. */
  static openFile(file: string): SafetensorsCheckpoint {
    const shard = openShard(path.resolve(file));
    const entries = new Map<string, Entry>();
    for (const tensor of shard.open.tensors) entries.set(tensor.name, { shard, tensor });
    return new SafetensorsCheckpoint([shard], entries);
  }

  /**
   * Opens a checkpoint directory: `model.safetensors.index.json` (its `weight_map`
   * maps every tensor name to a shard file in the directory) when present, else
   * `model.safetensors`. The index must agree exactly with the shards' contents.
   */
  static openDir(dir: string): SafetensorsCheckpoint {
    const root = path.resolve(dir);
    const indexFile = path.join(root, 'model.safetensors.index.json');
    if (fs.existsSync(indexFile)) return SafetensorsCheckpoint.openIndex(root, indexFile);
    const single = path.join(root, 'model.safetensors');
    if (fs.existsSync(single)) return SafetensorsCheckpoint.openFile(single);
    throw new SafetensorsError('ST_INDEX', `${root}: neither model.safetensors.index.json nor model.safetensors exists`);
  }

  private static openIndex(root: string, indexFile: string): SafetensorsCheckpoint {
    function fail(problem: string): never {
      throw new SafetensorsError('ST_INDEX', `safetensors index ${indexFile}: ${problem}`);
    }
    let index: unknown;
    try {
      index = JSON.parse(fs.readFileSync(indexFile, 'utf8'));
    } catch (e) {
      fail(`cannot read JSON: ${(e as Error).message}`);
    }
    if (typeof index !== 'object' || index === null || Array.isArray(index)) fail('not a JSON object');
    const weightMap = (index as { weight_map?: unknown }).weight_map;
    if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap)) {
      fail('"weight_map" must be an object of tensor name → shard file');
    }
    const wanted = new Map<string, string>(); // tensor → shard path
    const shardFiles: string[] = [];
    for (const [name, shardName] of Object.entries(weightMap as Record<string, unknown>)) {
      if (typeof shardName !== 'string' || shardName === '' || shardName.includes('\0')) {
        fail(`tensor "${name}": shard must be a non-empty file name`);
      }
      // A lexical check: symlinks are allowed (the Hugging Face cache links shards
      // to blobs elsewhere), names that climb out of the directory are not.
      const file = path.resolve(root, shardName);
      const rel = path.relative(root, file);
      if (path.isAbsolute(shardName) || rel === '' || rel === '..' || rel.startsWith(`..${path.sep}`) || path.isAbsolute(rel)) {
        fail(`tensor "${name}": shard "${shardName}" is outside the checkpoint directory`);
      }
      if (!shardFiles.includes(file)) {
        let isFile = false;
        try {
          isFile = fs.statSync(file).isFile();
        } catch {
          isFile = false;
        }
        if (!isFile) fail(`tensor "${name}": shard file "${shardName}" does not exist`);
        shardFiles.push(file);
      }
      wanted.set(name, file);
    }

    const shards: Shard[] = [];
    try {
      for (const file of shardFiles) shards.push(openShard(file));
      const entries = new Map<string, Entry>();
      for (const shard of shards) {
        for (const tensor of shard.open.tensors) {
          const other = entries.get(tensor.name);
          if (other) {
            fail(`tensor "${tensor.name}" is present in both ${path.basename(other.shard.file)} and ${path.basename(shard.file)}`);
          }
          if (wanted.get(tensor.name) !== shard.file) {
            fail(
              wanted.has(tensor.name)
                ? `tensor "${tensor.name}" is in ${path.basename(shard.file)} but the index says ${path.relative(root, wanted.get(tensor.name)!)}`
                : `tensor "${tensor.name}" in ${path.basename(shard.file)} is not listed in weight_map`,
            );
          }
          entries.set(tensor.name, { shard, tensor });
        }
      }
      for (const [name, file] of wanted) {
        if (!entries.has(name)) fail(`tensor "${name}" is listed for ${path.relative(root, file)} but that shard does not contain it`);
      }
      return new SafetensorsCheckpoint(shards, entries);
    } catch (e) {
      for (const s of shards) s.open.handle.close();
      throw e;
    }
  }

  /** Tensor names, sorted. */
  names(): string[] {
    return [...this.entries.keys()].sort();
  }

  has(name: string): boolean {
    return this.entries.has(name);
  }

  info(name: string): TensorInfo {
    const { shard, tensor } = this.entry(name);
    return { name, dtype: tensor.dtype, shape: [...tensor.shape], file: shard.file };
  }

  /** Zero-copy, read-only view of the tensor's bytes; valid until close(). */
  bytes(name: string): Uint8Array {
    this.assertOpen();
    const { shard, tensor } = this.entry(name);
    return new Uint8Array(shard.open.buffer, shard.open.dataOffset + tensor.begin, tensor.end - tensor.begin);
  }

  /**
   * The tensor as float32: a zero-copy view for F32 data at a 4-byte-aligned file
   * offset (valid until close()), else a new array (F32 copy, F16/BF16 converted).
   */
  float32(name: string): Float32Array {
    this.assertOpen();
    const { shard, tensor } = this.entry(name);
    const offset = shard.open.dataOffset + tensor.begin;
    if (tensor.dtype === 'F32' && offset % 4 === 0 && LITTLE_ENDIAN) return new Float32Array(shard.open.buffer, offset, (tensor.end - tensor.begin) / 4);
    const out = new Float32Array((tensor.end - tensor.begin) / (tensor.dtype === 'F32' ? 4 : 2));
    this.float32Into(name, out);
    return out;
  }

  /**
   * The tensor's values as float32 into out[at ..] (F16/BF16 converted exactly): for
   * callers that reuse one buffer across many tensors. Fresh memory is slow to touch
   * on some virtual machines (about 4 us per page here), more than the conversion.
   */
  float32Into(name: string, out: Float32Array, at = 0): void {
    this.assertOpen();
    const { shard, tensor } = this.entry(name);
    const offset = shard.open.dataOffset + tensor.begin;
    const nbytes = tensor.end - tensor.begin;
    const buffer = shard.open.buffer;
    if (!LITTLE_ENDIAN) throw new SafetensorsError('ST_CONVERT', 'big-endian hosts are not supported');
    const n = nbytes / (tensor.dtype === 'F32' ? 4 : 2);
    if (!Number.isInteger(at) || at < 0 || at + n > out.length) {
      throw new SafetensorsError('ST_CONVERT', `tensor "${name}": ${n} values do not fit at ${at} of ${out.length}`);
    }
    switch (tensor.dtype) {
      case 'F32':
        if (offset % 4 === 0) out.set(new Float32Array(buffer, offset, n), at);
        else new Uint8Array(out.buffer, out.byteOffset + at * 4, nbytes).set(new Uint8Array(buffer, offset, nbytes));
        return;
      case 'BF16': {
        const src = halfWords(buffer, offset, nbytes);
        const dst = new Uint32Array(out.buffer, out.byteOffset + at * 4, n);
        for (let i = 0; i < n; i++) dst[i] = src[i] << 16;
        return;
      }
      case 'F16': {
        const src = halfWords(buffer, offset, nbytes);
        const table = f16ToF32Table();
        for (let i = 0; i < n; i++) out[at + i] = table[src[i]];
        return;
      }
      default:
        throw new SafetensorsError('ST_CONVERT', `tensor "${name}": cannot convert ${tensor.dtype} to float32`);
    }
  }

  /** Unmaps every file. Views handed out before become empty (length 0). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.shards) s.open.handle.close();
  }

  private entry(name: string): Entry {
    const e = this.entries.get(name);
    if (!e) throw new SafetensorsError('ST_NO_TENSOR', `no tensor named "${name}" in the checkpoint`);
    return e;
  }

  private assertOpen(): void {
    if (this.closed) throw new SafetensorsError('ST_CLOSED', 'the safetensors checkpoint is closed');
  }
}

/** 16-bit words at `offset` (a view when 2-byte aligned, else a copy). */
function halfWords(buffer: ArrayBuffer, offset: number, nbytes: number): Uint16Array {
  if (offset % 2 === 0) return new Uint16Array(buffer, offset, nbytes / 2);
  return new Uint16Array(new Uint8Array(buffer, offset, nbytes).slice().buffer);
}
