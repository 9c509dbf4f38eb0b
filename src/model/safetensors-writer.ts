// Writing safetensors files (test fixtures, the built-in demo model, converted
// checkpoints). Tensors are produced one at a time by `fill` and streamed to disk, so
// memory stays bounded by the largest tensor. The file is written under a temporary
// name and renamed into place, so a failed write never leaves a truncated file.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { f32ToF16 } from './safetensors.js';

export interface WriteEntry {
  name: string;
  dtype: 'F32' | 'F16' | 'BF16';
  shape: number[];
}

const ELEMENT_SIZE = { F32: 4, F16: 2, BF16: 2 } as const;

function elementCount(entry: WriteEntry): number {
  let n = 1;
  for (const d of entry.shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new Error(`writeSafetensors: tensor "${entry.name}": shape ${JSON.stringify(entry.shape)} must hold non-negative integers`);
    }
    n *= d;
  }
  if (!Number.isSafeInteger(n)) throw new Error(`writeSafetensors: tensor "${entry.name}": shape too large`);
  return n;
}

/** Encodes float32 values as the dtype's little-endian bytes (16-bit ones into the front of `half`, when it is large enough). */
function encode(values: Float32Array, dtype: WriteEntry['dtype'], half?: Uint16Array): Uint8Array {
  if (os.endianness() !== 'LE') throw new Error('writeSafetensors: big-endian hosts are not supported');
  if (dtype === 'F32') return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const out = half && half.length >= values.length ? half.subarray(0, values.length) : new Uint16Array(values.length);
  if (dtype === 'BF16') {
    // f32ToBf16 over the bit patterns, inlined (a model's worth of values goes through here).
    const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
    for (let i = 0; i < bits.length; i++) {
      const b = bits[i];
      // NaN stays a quiet NaN; otherwise round to nearest even (no carry past 2^32).
      out[i] = (b & 0x7f800000) === 0x7f800000 && (b & 0x007fffff) !== 0 ? (b >>> 16) | 0x0040 : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
    }
  } else {
    for (let i = 0; i < values.length; i++) out[i] = f32ToF16(values[i]);
  }
  return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
}

function writeAll(fd: number, bytes: Uint8Array): void {
  let done = 0;
  while (done < bytes.length) done += fs.writeSync(fd, bytes, done, bytes.length - done);
}

/**
 * Writes a safetensors file with the tensors in `entries` order, contiguous from
 * offset 0 of the data section. `fill(name, index)` returns each tensor's values
 * (length = product of its shape), converted to the entry's dtype with round to
 * nearest even. The header is padded with spaces so the data section starts at a
 * multiple of 8 bytes.
 */
export function writeSafetensors(
  file: string,
  entries: WriteEntry[],
  fill: (name: string, index: number) => Float32Array,
  metadata?: Record<string, string>,
): void {
  const header: Record<string, unknown> = {};
  if (metadata) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new Error(`writeSafetensors: metadata "${k}" must be a string`);
    }
    header.__metadata__ = metadata;
  }
  const counts: number[] = [];
  let offset = 0;
  for (const entry of entries) {
    if (entry.name === '__metadata__' || Object.prototype.hasOwnProperty.call(header, entry.name)) {
      throw new Error(`writeSafetensors: duplicate or reserved tensor name "${entry.name}"`);
    }
    const size = ELEMENT_SIZE[entry.dtype];
    if (size === undefined) throw new Error(`writeSafetensors: tensor "${entry.name}": unsupported dtype ${String(entry.dtype)}`);
    const count = elementCount(entry);
    counts.push(count);
    const end = offset + count * size;
    header[entry.name] = { dtype: entry.dtype, shape: entry.shape, data_offsets: [offset, end] };
    offset = end;
  }

  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const padded = Math.ceil((8 + json.length) / 8) * 8 - 8;
  if (padded > json.length) json = Buffer.concat([json, Buffer.alloc(padded - json.length, 0x20)]);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(json.length));

  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  const fd = fs.openSync(tmp, 'w');
  let ok = false;
  try {
    writeAll(fd, prefix);
    writeAll(fd, json);
    // One buffer for the 16-bit encodings of every tensor (the largest's size).
    const half = new Uint16Array(entries.some((e) => e.dtype !== 'F32') ? counts.reduce((a, c) => Math.max(a, c), 0) : 0);
    entries.forEach((entry, i) => {
      const values = fill(entry.name, i);
      if (!(values instanceof Float32Array)) {
        throw new Error(`writeSafetensors: fill("${entry.name}") must return a Float32Array`);
      }
      if (values.length !== counts[i]) {
        throw new Error(
          `writeSafetensors: tensor "${entry.name}": shape ${JSON.stringify(entry.shape)} needs ${counts[i]} values, fill returned ${values.length}`,
        );
      }
      writeAll(fd, encode(values, entry.dtype, half));
    });
    ok = true;
  } finally {
    fs.closeSync(fd);
    if (!ok) fs.rmSync(tmp, { force: true });
  }
  fs.renameSync(tmp, file);
}
