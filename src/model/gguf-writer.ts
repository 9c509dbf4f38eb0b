// A GGUF (version 3) writer: the single-file model format of ggml / llama.cpp.
//
// File layout (all integers little-endian):
//   magic "GGUF" · u32 version (3) · u64 tensor_count · u64 metadata_kv_count
//   metadata: { string key · u32 value_type · value }*
//   tensor infos: { string name · u32 n_dims · u64 ne[n_dims] · u32 ggml_type · u64 offset }*
//   padding to `alignment` · tensor data, each tensor at `offset` (a multiple of alignment)
//   from the start of the data section, padded to the alignment between tensors.
// A string is a u64 byte length followed by UTF-8 bytes (no terminator); a bool is one
// byte; an array is u32 element type · u64 count · the elements.
//
// ggml dimension order: ne[0] is the fastest-varying (innermost) dimension, so a row-major
// tensor of shape [rows, cols] has ne = [cols, rows]: the dims are the shape reversed.
//
// Tensor data is produced and written one tensor at a time, so memory stays bounded by the
// largest tensor (plus its encoded bytes), whatever the model's size.

import { f16ToF32 as f16BitsToF32, f32ToF16 as f32ToF16Bits } from './safetensors.js';
import { closeSync, openSync, unlinkSync, writeSync } from 'node:fs';

/** Value types of GGUF metadata. */
export enum GgufValueType {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
}

export type GgufScalarType = Exclude<GgufValueType, GgufValueType.ARRAY>;
export type GgufScalar = number | bigint | boolean | string;

export type GgufKv =
  | { type: GgufScalarType; value: GgufScalar }
  | { type: GgufValueType.ARRAY; elementType: GgufScalarType; value: readonly GgufScalar[] };

/** The ggml tensor types this writer encodes. */
export enum GgmlType {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q8_0 = 8,
}

/** Elements per block and bytes per block of each tensor type. */
export const GGML_TYPE_LAYOUT: Readonly<Record<GgmlType, { blockSize: number; blockBytes: number }>> = {
  [GgmlType.F32]: { blockSize: 1, blockBytes: 4 },
  [GgmlType.F16]: { blockSize: 1, blockBytes: 2 },
  [GgmlType.Q4_0]: { blockSize: 32, blockBytes: 18 }, // f16 d; u8 qs[16]
  [GgmlType.Q8_0]: { blockSize: 32, blockBytes: 34 }, // f16 d; i8 qs[32]
};

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;

export class GgufError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GgufError';
  }
}

/** Bytes of a tensor of `shape` (row-major) stored as `type`. */
export function ggmlTensorBytes(type: GgmlType, shape: readonly number[]): number {
  const { blockSize, blockBytes } = GGML_TYPE_LAYOUT[type];
  const n = shape.reduce((a, b) => a * b, 1);
  const rowLen = shape.length === 0 ? 1 : shape[shape.length - 1];
  if (rowLen % blockSize !== 0) {
    throw new GgufError(`a ${GgmlType[type]} tensor needs rows that are a multiple of ${blockSize} elements, got ${rowLen}`);
  }
  return (n / blockSize) * blockBytes;
}

// ---------------------------------------------------------------------------------
// Scalar conversions and quantizers (the ggml reference block layouts)

// IEEE half conversions (round to nearest even) are the safetensors module's; re-exported
// under the names this module's users know.
export { f16ToF32 as f16BitsToF32, f32ToF16 as f32ToF16Bits } from './safetensors.js';

/** An output of n bytes: the front of `out` when given (it must be large enough), else a new array. */
function outBytes(n: number, out: Uint8Array | undefined): Uint8Array {
  if (!out) return new Uint8Array(n);
  if (out.length < n) throw new GgufError(`output buffer of ${out.length} bytes is smaller than ${n}`);
  return out.subarray(0, n);
}

function encodeF32(x: Float32Array, into?: Uint8Array): Uint8Array {
  const out = outBytes(x.length * 4, into);
  const dv = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (let i = 0; i < x.length; i++) dv.setFloat32(i * 4, x[i], true);
  return out;
}

function encodeF16(x: Float32Array, into?: Uint8Array): Uint8Array {
  const out = outBytes(x.length * 2, into);
  const dv = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (let i = 0; i < x.length; i++) dv.setUint16(i * 2, f32ToF16Bits(x[i]), true);
  return out;
}

/**
 * Q8_0: blocks of 32 values as { f16 d; int8 q[32] } with d = max|x| / 127 and
 * q = round(x / d) (half away from zero, as C's roundf), so x ≈ d * q. Into `into` when
 * given (at least 34 bytes per block).
 */
export function quantizeQ8_0(x: Float32Array, into?: Uint8Array): Uint8Array {
  if (x.length % 32 !== 0) throw new GgufError(`Q8_0 needs a multiple of 32 values, got ${x.length}`);
  const nb = x.length / 32;
  const out = outBytes(nb * 34, into);
  const q = new Int8Array(out.buffer, out.byteOffset, out.byteLength);
  // Branch-free on the values' signs: weights have random signs, and a branch per value
  // made this four times slower.
  for (let b = 0, base = 0, o = 0; b < nb; b++, base += 32, o += 34) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[base + j]));
    const d = Math.fround(amax / 127);
    const id = d !== 0 ? Math.fround(1 / d) : 0;
    const h = f32ToF16Bits(d);
    out[o] = h & 0xff;
    out[o + 1] = h >>> 8;
    for (let j = 0; j < 32; j++) {
      // roundf: |v| <= 127 (NaN: 0), and the float32 |v| plus 0.5 is exact in a double, so
      // truncating it rounds half away from zero; then the sign (s = -1: negate).
      const v = Math.fround(x[base + j] * id);
      const r = (Math.abs(v) + 0.5) | 0;
      const s = -+(v < 0);
      q[o + 2 + j] = (r ^ s) - s;
    }
  }
  return out;
}

/**
 * Q4_0: blocks of 32 values as { f16 d; uint8 q[16] } where d = m / -8 for the value m of
 * largest magnitude (sign kept), and the 4-bit q = min(15, trunc(x / d + 8.5)) (in float32
 * arithmetic, as ggml and the engine compute it: a double sum rounds some values on block
 * boundaries the other way) so that
 * x ≈ d * (q - 8). Byte j holds element j in its low nibble and element j + 16 in its high one.
 */
export function quantizeQ4_0(x: Float32Array, into?: Uint8Array): Uint8Array {
  if (x.length % 32 !== 0) throw new GgufError(`Q4_0 needs a multiple of 32 values, got ${x.length}`);
  const nb = x.length / 32;
  const out = outBytes(nb * 18, into);
  const dv = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (let b = 0; b < nb; b++) {
    const base = b * 32;
    let amax = 0;
    let max = 0;
    for (let j = 0; j < 32; j++) {
      const v = x[base + j];
      if (Math.abs(v) > amax) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = Math.fround(max / -8);
    const id = d !== 0 ? Math.fround(1 / d) : 0;
    const o = b * 18;
    dv.setUint16(o, f32ToF16Bits(d), true);
    for (let j = 0; j < 16; j++) {
      const q0 = Math.min(15, Math.trunc(Math.fround(Math.fround(x[base + j] * id) + 8.5)));
      const q1 = Math.min(15, Math.trunc(Math.fround(Math.fround(x[base + j + 16] * id) + 8.5)));
      out[o + 2 + j] = q0 | (q1 << 4);
    }
  }
  return out;
}

/** Inverse of quantizeQ8_0 (for checks). */
export function dequantizeQ8_0(bytes: Uint8Array): Float32Array {
  const nb = bytes.length / 34;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(nb * 32);
  for (let b = 0; b < nb; b++) {
    const d = f16BitsToF32(dv.getUint16(b * 34, true));
    for (let j = 0; j < 32; j++) out[b * 32 + j] = d * dv.getInt8(b * 34 + 2 + j);
  }
  return out;
}

/** Inverse of quantizeQ4_0 (for checks). */
export function dequantizeQ4_0(bytes: Uint8Array): Float32Array {
  const nb = bytes.length / 18;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(nb * 32);
  for (let b = 0; b < nb; b++) {
    const d = f16BitsToF32(dv.getUint16(b * 18, true));
    for (let j = 0; j < 16; j++) {
      const q = bytes[b * 18 + 2 + j];
      out[b * 32 + j] = d * ((q & 0x0f) - 8);
      out[b * 32 + j + 16] = d * ((q >> 4) - 8);
    }
  }
  return out;
}

/** Encodes row-major float32 values as a ggml tensor of `type` (into the front of `into` when given). */
export function encodeTensor(type: GgmlType, values: Float32Array, into?: Uint8Array): Uint8Array {
  switch (type) {
    case GgmlType.F32:
      return encodeF32(values, into);
    case GgmlType.F16:
      return encodeF16(values, into);
    case GgmlType.Q8_0:
      return quantizeQ8_0(values, into);
    case GgmlType.Q4_0:
      return quantizeQ4_0(values, into);
  }
}

// ---------------------------------------------------------------------------------
// Byte buffer for the header section

class ByteSink {
  private buf = new Uint8Array(4096);
  private dv = new DataView(this.buf.buffer);
  length = 0;

  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.length + n) cap *= 2;
    const next = new Uint8Array(cap);
    next.set(this.buf.subarray(0, this.length));
    this.buf = next;
    this.dv = new DataView(next.buffer);
  }

  u8(v: number): void {
    this.reserve(1);
    this.dv.setUint8(this.length, v);
    this.length += 1;
  }
  i8(v: number): void {
    this.reserve(1);
    this.dv.setInt8(this.length, v);
    this.length += 1;
  }
  u16(v: number): void {
    this.reserve(2);
    this.dv.setUint16(this.length, v, true);
    this.length += 2;
  }
  i16(v: number): void {
    this.reserve(2);
    this.dv.setInt16(this.length, v, true);
    this.length += 2;
  }
  u32(v: number): void {
    this.reserve(4);
    this.dv.setUint32(this.length, v, true);
    this.length += 4;
  }
  i32(v: number): void {
    this.reserve(4);
    this.dv.setInt32(this.length, v, true);
    this.length += 4;
  }
  f32(v: number): void {
    this.reserve(4);
    this.dv.setFloat32(this.length, v, true);
    this.length += 4;
  }
  f64(v: number): void {
    this.reserve(8);
    this.dv.setFloat64(this.length, v, true);
    this.length += 8;
  }
  u64(v: bigint): void {
    this.reserve(8);
    this.dv.setBigUint64(this.length, v, true);
    this.length += 8;
  }
  i64(v: bigint): void {
    this.reserve(8);
    this.dv.setBigInt64(this.length, v, true);
    this.length += 8;
  }
  bytes(b: Uint8Array): void {
    this.reserve(b.length);
    this.buf.set(b, this.length);
    this.length += b.length;
  }
  string(s: string): void {
    const b = new TextEncoder().encode(s);
    this.u64(BigInt(b.length));
    this.bytes(b);
  }
  zeros(n: number): void {
    this.reserve(n);
    this.buf.fill(0, this.length, this.length + n);
    this.length += n;
  }
  contents(): Uint8Array {
    return this.buf.subarray(0, this.length);
  }
}

const INT_RANGES: Partial<Record<GgufScalarType, [bigint, bigint]>> = {
  [GgufValueType.UINT8]: [0n, 0xffn],
  [GgufValueType.INT8]: [-0x80n, 0x7fn],
  [GgufValueType.UINT16]: [0n, 0xffffn],
  [GgufValueType.INT16]: [-0x8000n, 0x7fffn],
  [GgufValueType.UINT32]: [0n, 0xffffffffn],
  [GgufValueType.INT32]: [-0x80000000n, 0x7fffffffn],
  [GgufValueType.UINT64]: [0n, 0xffffffffffffffffn],
  [GgufValueType.INT64]: [-0x8000000000000000n, 0x7fffffffffffffffn],
};

function checkScalar(key: string, type: GgufScalarType, v: GgufScalar): void {
  const name = GgufValueType[type];
  if (type === GgufValueType.STRING) {
    if (typeof v !== 'string') throw new GgufError(`metadata ${key}: ${name} value must be a string, got ${typeof v}`);
    return;
  }
  if (type === GgufValueType.BOOL) {
    if (typeof v !== 'boolean') throw new GgufError(`metadata ${key}: BOOL value must be a boolean, got ${typeof v}`);
    return;
  }
  if (type === GgufValueType.FLOAT32 || type === GgufValueType.FLOAT64) {
    if (typeof v !== 'number') throw new GgufError(`metadata ${key}: ${name} value must be a number, got ${typeof v}`);
    return;
  }
  const range = INT_RANGES[type];
  if (!range) throw new GgufError(`metadata ${key}: unknown value type ${String(type)}`);
  if (typeof v === 'number' && !Number.isInteger(v)) throw new GgufError(`metadata ${key}: ${name} value must be an integer, got ${v}`);
  if (typeof v !== 'number' && typeof v !== 'bigint') throw new GgufError(`metadata ${key}: ${name} value must be an integer, got ${typeof v}`);
  const b = BigInt(v);
  if (b < range[0] || b > range[1]) throw new GgufError(`metadata ${key}: ${v} is outside the range of ${name}`);
}

function writeScalar(sink: ByteSink, type: GgufScalarType, v: GgufScalar): void {
  switch (type) {
    case GgufValueType.UINT8:
      return sink.u8(Number(v));
    case GgufValueType.INT8:
      return sink.i8(Number(v));
    case GgufValueType.UINT16:
      return sink.u16(Number(v));
    case GgufValueType.INT16:
      return sink.i16(Number(v));
    case GgufValueType.UINT32:
      return sink.u32(Number(v));
    case GgufValueType.INT32:
      return sink.i32(Number(v));
    case GgufValueType.FLOAT32:
      return sink.f32(v as number);
    case GgufValueType.BOOL:
      return sink.u8(v ? 1 : 0);
    case GgufValueType.STRING:
      return sink.string(v as string);
    case GgufValueType.UINT64:
      return sink.u64(BigInt(v));
    case GgufValueType.INT64:
      return sink.i64(BigInt(v));
    case GgufValueType.FLOAT64:
      return sink.f64(v as number);
  }
}

// ---------------------------------------------------------------------------------

/** Values of a tensor: row-major float32, given directly or produced on demand. */
export type TensorSource = Float32Array | (() => Float32Array);

interface PendingTensor {
  name: string;
  /** Row-major shape (the ggml ne are its reverse). */
  shape: number[];
  type: GgmlType;
  bytes: number;
  source: TensorSource;
}

export interface GgufWriteSummary {
  tensors: number;
  metadata: number;
  /** Offset of the tensor data section in the file. */
  dataOffset: number;
  fileBytes: number;
}

/**
 * Collects metadata and tensor descriptions, then writes the file in one pass with
 * `write(path)`. Tensor values are requested from their sources one at a time, in the
 * order the tensors were added.
 */
export class GgufWriter {
  private readonly kv = new Map<string, GgufKv>();
  private readonly tensors: PendingTensor[] = [];
  private readonly tensorNames = new Set<string>();
  private alignment: number;

  constructor(opts: { alignment?: number } = {}) {
    this.alignment = GGUF_DEFAULT_ALIGNMENT;
    if (opts.alignment !== undefined) this.setAlignment(opts.alignment);
  }

  /** Sets the data alignment; a non-default one is recorded as general.alignment. */
  setAlignment(alignment: number): void {
    if (!Number.isInteger(alignment) || alignment < 8 || alignment % 8 !== 0 || alignment > 0xffffffff) {
      throw new GgufError(`alignment must be a positive multiple of 8, got ${alignment}`);
    }
    this.alignment = alignment;
    if (alignment !== GGUF_DEFAULT_ALIGNMENT) this.kv.set('general.alignment', { type: GgufValueType.UINT32, value: alignment });
    else this.kv.delete('general.alignment');
  }

  get dataAlignment(): number {
    return this.alignment;
  }

  /** Adds a typed metadata pair; a key may be set only once. */
  add(key: string, kv: GgufKv): this {
    if (typeof key !== 'string' || key.length === 0) throw new GgufError('metadata keys must be non-empty strings');
    if (this.kv.has(key)) throw new GgufError(`duplicate metadata key ${key}`);
    if (kv.type === GgufValueType.ARRAY) {
      if (kv.elementType === (GgufValueType.ARRAY as number)) throw new GgufError(`metadata ${key}: nested arrays are not supported`);
      for (const v of kv.value) checkScalar(key, kv.elementType, v);
    } else {
      checkScalar(key, kv.type, kv.value);
    }
    if (key === 'general.alignment') {
      if (kv.type !== GgufValueType.UINT32) throw new GgufError('general.alignment must be a UINT32');
      this.setAlignment(Number(kv.value));
      return this;
    }
    this.kv.set(key, kv);
    return this;
  }

  addString(key: string, value: string): this {
    return this.add(key, { type: GgufValueType.STRING, value });
  }
  addUint32(key: string, value: number): this {
    return this.add(key, { type: GgufValueType.UINT32, value });
  }
  addInt32(key: string, value: number): this {
    return this.add(key, { type: GgufValueType.INT32, value });
  }
  addUint64(key: string, value: number | bigint): this {
    return this.add(key, { type: GgufValueType.UINT64, value });
  }
  addFloat32(key: string, value: number): this {
    return this.add(key, { type: GgufValueType.FLOAT32, value });
  }
  addBool(key: string, value: boolean): this {
    return this.add(key, { type: GgufValueType.BOOL, value });
  }
  addArray(key: string, elementType: GgufScalarType, value: readonly GgufScalar[]): this {
    return this.add(key, { type: GgufValueType.ARRAY, elementType, value });
  }

  /**
   * Adds a tensor of row-major `shape` stored as `type`; its values are read from `source`
   * (called during `write`) and must have shape.product elements.
   */
  addTensor(name: string, shape: readonly number[], type: GgmlType, source: TensorSource): this {
    if (this.tensorNames.has(name)) throw new GgufError(`duplicate tensor ${name}`);
    if (shape.length < 1 || shape.length > 4) throw new GgufError(`tensor ${name}: ggml tensors have 1 to 4 dimensions, got ${shape.length}`);
    if (shape.some((d) => !Number.isInteger(d) || d < 1)) throw new GgufError(`tensor ${name}: bad shape [${shape}]`);
    if (!(type in GGML_TYPE_LAYOUT)) throw new GgufError(`tensor ${name}: unsupported ggml type ${String(type)}`);
    let bytes: number;
    try {
      bytes = ggmlTensorBytes(type, shape);
    } catch (e) {
      throw new GgufError(`tensor ${name}: ${(e as Error).message}`);
    }
    this.tensorNames.add(name);
    this.tensors.push({ name, shape: [...shape], type, bytes, source });
    return this;
  }

  private pad(n: number): number {
    return (this.alignment - (n % this.alignment)) % this.alignment;
  }

  /** The header, metadata and tensor infos, padded to the data section. */
  private headerBytes(): { header: Uint8Array; offsets: number[] } {
    const s = new ByteSink();
    s.u32(GGUF_MAGIC);
    s.u32(GGUF_VERSION);
    s.u64(BigInt(this.tensors.length));
    s.u64(BigInt(this.kv.size));
    for (const [key, kv] of this.kv) {
      s.string(key);
      s.u32(kv.type);
      if (kv.type === GgufValueType.ARRAY) {
        s.u32(kv.elementType);
        s.u64(BigInt(kv.value.length));
        for (const v of kv.value) writeScalar(s, kv.elementType, v);
      } else {
        writeScalar(s, kv.type, kv.value);
      }
    }
    const offsets: number[] = [];
    let off = 0;
    for (const t of this.tensors) {
      offsets.push(off);
      s.string(t.name);
      s.u32(t.shape.length);
      for (let i = t.shape.length - 1; i >= 0; i--) s.u64(BigInt(t.shape[i]));
      s.u32(t.type);
      s.u64(BigInt(off));
      off += t.bytes + this.pad(t.bytes);
    }
    s.zeros(this.pad(s.length));
    return { header: s.contents(), offsets };
  }

  /** Writes the file. Tensor sources are called one at a time, in order. */
  write(path: string): GgufWriteSummary {
    const { header, offsets } = this.headerBytes();
    let fd: number;
    try {
      fd = openSync(path, 'w');
    } catch (e) {
      throw new GgufError(`cannot write ${path}: ${(e as Error).message}`);
    }
    let pos = 0;
    const put = (b: Uint8Array) => {
      let done = 0;
      while (done < b.length) done += writeSync(fd, b, done, b.length - done, pos + done);
      pos += b.length;
    };
    let encoded = new Uint8Array(0);
    try {
      put(header);
      const dataOffset = pos;
      this.tensors.forEach((t, i) => {
        if (pos - dataOffset !== offsets[i]) throw new GgufError(`internal: tensor ${t.name} at ${pos - dataOffset}, expected ${offsets[i]}`);
        const values = typeof t.source === 'function' ? t.source() : t.source;
        const n = t.shape.reduce((a, b) => a * b, 1);
        if (!(values instanceof Float32Array) || values.length !== n) {
          throw new GgufError(`tensor ${t.name}: source gave ${values?.length} values, shape [${t.shape}] needs ${n}`);
        }
        // One output buffer for every tensor (the largest's size).
        if (encoded.length < t.bytes) {
          encoded = new Uint8Array(0);
          encoded = new Uint8Array(t.bytes);
        }
        const enc = encodeTensor(t.type, values, encoded);
        put(enc);
        const p = this.pad(enc.length);
        if (p > 0) put(new Uint8Array(p));
      });
      closeSync(fd);
      return { tensors: this.tensors.length, metadata: this.kv.size, dataOffset, fileBytes: pos };
    } catch (e) {
      // No half-written file is left behind.
      closeSync(fd);
      try {
        unlinkSync(path);
      } catch {
        // already gone
      }
      throw e;
    }
  }
}
