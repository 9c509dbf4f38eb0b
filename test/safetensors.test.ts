import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { nativeAddonPath } from '../src/engine/native.js';
import {
  SafetensorsCheckpoint,
  SafetensorsError,
  bf16ToF32,
  f16ToF32,
  f32ToBf16,
  f32ToF16,
} from '../src/model/safetensors.js';
import { writeSafetensors, type WriteEntry } from '../src/model/safetensors-writer.js';

function tempDir(t: Test): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moe-st-test-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A raw file: 8-byte LE header length, header bytes, data bytes. */
function rawFile(header: string | Buffer | object, data: Buffer | number = 0, declaredLength?: bigint): Buffer {
  const h = Buffer.isBuffer(header) ? header : Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(declaredLength ?? BigInt(h.length));
  return Buffer.concat([len, h, Buffer.isBuffer(data) ? data : Buffer.alloc(data)]);
}

function expectCode(t: Test, fn: () => unknown, code: string, message?: RegExp): void {
  try {
    const r = fn();
    if (r instanceof SafetensorsCheckpoint) r.close();
    t.fail(`expected ${code}, nothing thrown`);
  } catch (e) {
    t.ok(e instanceof SafetensorsError, `a SafetensorsError (${(e as Error).message})`);
    t.equal((e as SafetensorsError).code, code, (e as Error).message);
    if (message) t.match((e as Error).message, message);
  }
}

const f32 = (x: number) => Math.fround(x);
const SPECIAL = [
  0, -0, 1, -1, 0.1, -2.5, 3.14159, 65504, 65519, 65520, 1e5, -1e5, 6e-8, 5.96e-8, 2 ** -24, 2 ** -25, 3 * 2 ** -25,
  2 ** -14, 2 ** -14 - 2 ** -25, 1e-40, -1e-45, 2 ** -130, 3.4028234663852886e38, -3.4028234663852886e38, 1 + 2 ** -8,
  1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11, Infinity, -Infinity, NaN,
].map(f32);

function sameValue(a: number, b: number): boolean {
  return Object.is(a, b) || (Number.isNaN(a) && Number.isNaN(b));
}

t.test('f16 conversions', async (t) => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [65504, 0x7bff],
    [65519, 0x7bff],
    [65520, 0x7c00], // halfway to the next binade (inf): ties to even
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // tie between 0 and 1: even
    [1.5 * 2 ** -25, 0x0001],
    [3 * 2 ** -25, 0x0002], // tie between 1 and 2: even
    [5 * 2 ** -25, 0x0002], // tie between 2 and 3: even
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -14 - 2 ** -25, 0x0400], // tie between max subnormal and min normal: even
    [2 ** -14 - 2 ** -24, 0x03ff],
    [1 + 2 ** -11, 0x3c00], // tie: even
    [1 + 3 * 2 ** -11, 0x3c02], // tie: even
    [1 + 2 ** -11 + 2 ** -20, 0x3c01], // above the tie
    [1e-40, 0x0000],
  ];
  for (const [x, h] of cases) t.equal(f32ToF16(x), h, `f32ToF16(${x}) = 0x${h.toString(16)}`);
  const nan = f32ToF16(NaN);
  t.ok((nan & 0x7c00) === 0x7c00 && (nan & 0x3ff) !== 0, 'NaN stays NaN');
  t.ok(Number.isNaN(f16ToF32(0x7e00)));
  t.equal(f16ToF32(0x0001), 2 ** -24);
  t.equal(f16ToF32(0x7bff), 65504);
  t.equal(f16ToF32(0xfc00), -Infinity);
  t.ok(Object.is(f16ToF32(0x8000), -0));
  let bad = 0;
  for (let h = 0; h < 0x10000; h++) {
    const x = f16ToF32(h);
    if (Number.isNaN(x)) continue;
    if (f32ToF16(x) !== h) bad++;
  }
  t.equal(bad, 0, 'every non-NaN half round-trips exactly');
  // Random floats: the result is the nearest half (ties checked above).
  let notNearest = 0;
  let seed = 12345;
  for (let i = 0; i < 20000; i++) {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    const x = f32((seed / 2 ** 32 - 0.5) * 2 ** ((i % 40) - 26));
    const h = f32ToF16(x);
    const err = Math.abs(f16ToF32(h) - x);
    for (const n of [h - 1, h + 1]) {
      if ((n & 0x7fff) > 0x7bff || (n & 0x8000) !== (h & 0x8000)) continue;
      if (Math.abs(f16ToF32(n) - x) < err) notNearest++;
    }
  }
  t.equal(notNearest, 0, 'random values round to the nearest half');
});

t.test('bf16 conversions', async (t) => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3f80],
    [-1, 0xbf80],
    [1 + 2 ** -8, 0x3f80], // tie: even
    [1 + 3 * 2 ** -8, 0x3f82], // tie: even
    [1 + 2 ** -8 + 2 ** -20, 0x3f81],
    [3.4028234663852886e38, 0x7f80], // max float rounds to inf
    [Infinity, 0x7f80],
    [-Infinity, 0xff80],
    [2 ** -130, 0x0008], // subnormal, exact
    [2 ** -149, 0x0000], // below half of the smallest bf16 subnormal
  ];
  for (const [x, h] of cases) t.equal(f32ToBf16(x), h, `f32ToBf16(${x}) = 0x${h.toString(16)}`);
  const nan = f32ToBf16(NaN);
  t.ok((nan & 0x7f80) === 0x7f80 && (nan & 0x7f) !== 0, 'NaN stays NaN');
  t.ok(Number.isNaN(bf16ToF32(nan)));
  t.equal(bf16ToF32(0x0008), 2 ** -130);
  let bad = 0;
  for (let h = 0; h < 0x10000; h++) {
    const x = bf16ToF32(h);
    if (Number.isNaN(x)) continue;
    if (f32ToBf16(x) !== h) bad++;
  }
  t.equal(bad, 0, 'every non-NaN bf16 round-trips exactly');
});

t.test('write then read F32 / F16 / BF16', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'model.safetensors');
  const random = Float32Array.from({ length: 257 }, (_, i) => Math.sin(i * 1.7) * 10 ** ((i % 9) - 4));
  const values: Record<string, Float32Array> = {
    'a.f32': Float32Array.from(SPECIAL),
    'a.f16': Float32Array.from(SPECIAL),
    'a.bf16': Float32Array.from(SPECIAL),
    'b.f16': random,
    'b.bf16': random,
    'b.f32': random,
    empty: new Float32Array(0),
    odd: Float32Array.from([1, 2, 3]),
    'after.odd': Float32Array.from([4, 5]),
  };
  const entries: WriteEntry[] = [
    { name: 'a.f32', dtype: 'F32', shape: [SPECIAL.length] },
    { name: 'a.f16', dtype: 'F16', shape: [SPECIAL.length, 1] },
    { name: 'a.bf16', dtype: 'BF16', shape: [1, SPECIAL.length] },
    { name: 'b.f16', dtype: 'F16', shape: [257] },
    { name: 'b.bf16', dtype: 'BF16', shape: [257] },
    { name: 'b.f32', dtype: 'F32', shape: [257] },
    { name: 'empty', dtype: 'F32', shape: [0, 4] },
    { name: 'odd', dtype: 'F16', shape: [3] },
    { name: 'after.odd', dtype: 'F32', shape: [2] }, // starts 2 bytes off 4-byte alignment
  ];
  writeSafetensors(file, entries, (name) => values[name], { format: 'pt', note: 'héllo ☃' });

  const raw = fs.readFileSync(file);
  const headerLen = Number(raw.readBigUInt64LE(0));
  t.equal((8 + headerLen) % 8, 0, 'data section starts at a multiple of 8');
  t.match(raw.subarray(8, 8 + headerLen).toString('utf8'), /^\{.*\} *$/);

  const ck = SafetensorsCheckpoint.openFile(file);
  t.teardown(() => ck.close());
  t.same(ck.names(), entries.map((e) => e.name).sort());
  t.same(ck.metadata, { format: 'pt', note: 'héllo ☃' });
  t.same(ck.info('a.f16'), { name: 'a.f16', dtype: 'F16', shape: [SPECIAL.length, 1], file });
  t.ok(ck.has('b.f32'));
  t.notOk(ck.has('nope'));
  expectCode(t, () => ck.info('nope'), 'ST_NO_TENSOR');

  const expect = {
    F32: (x: number) => x,
    F16: (x: number) => f16ToF32(f32ToF16(x)),
    BF16: (x: number) => bf16ToF32(f32ToBf16(x)),
  };
  for (const e of entries) {
    const got = ck.float32(e.name);
    const want = Array.from(values[e.name], expect[e.dtype]);
    t.equal(got.length, want.length, `${e.name} length`);
    const mismatches = want.filter((w, i) => !sameValue(got[i], w)).length;
    t.equal(mismatches, 0, `${e.name} values`);
    t.equal(ck.bytes(e.name).length, want.length * { F32: 4, F16: 2, BF16: 2 }[e.dtype]);
    // The same values into a reused buffer at an offset, and nothing around them touched.
    const into = new Float32Array(want.length + 5).fill(-7);
    ck.float32Into(e.name, into, 3);
    t.equal(into.subarray(3, 3 + want.length).filter((v, i) => !sameValue(v, got[i])).length, 0, `${e.name} float32Into values`);
    t.same([...into.subarray(0, 3), ...into.subarray(3 + want.length)], [-7, -7, -7, -7, -7], `${e.name} float32Into writes its values only`);
    if (want.length > 0) expectCode(t, () => ck.float32Into(e.name, into, 6), 'ST_CONVERT');
  }
  expectCode(t, () => ck.float32Into('b.f32', new Float32Array(300), -1), 'ST_CONVERT');
  // Spot checks of rounding through the file.
  const f16 = ck.float32('a.f16');
  t.equal(f16[SPECIAL.indexOf(f32(65520))], Infinity, 'F16 overflow → inf');
  t.equal(f16[SPECIAL.indexOf(f32(2 ** -25))], 0, 'F16 tie to even at the subnormal bottom');
  t.equal(f16[SPECIAL.indexOf(f32(3 * 2 ** -25))], 2 ** -23);
  t.ok(Number.isNaN(f16[SPECIAL.findIndex(Number.isNaN)]), 'F16 NaN');
  const bf = ck.float32('a.bf16');
  t.equal(bf[SPECIAL.indexOf(f32(1 + 3 * 2 ** -8))], 1 + 2 ** -6);
  t.equal(bf[SPECIAL.indexOf(f32(2 ** -130))], 2 ** -130, 'BF16 subnormal');
  t.ok(Object.is(bf[SPECIAL.findIndex((x) => Object.is(x, -0))], -0), 'BF16 -0');

  // Aligned F32 is a zero-copy view into the mapping; misaligned F32 is a copy.
  const view = ck.float32('a.f32');
  t.equal(view.buffer.byteLength, raw.length, 'aligned F32: view over the whole mapping');
  const copy = ck.float32('after.odd');
  t.not(copy.buffer.byteLength, raw.length, 'misaligned F32: a copy');
  t.same(Array.from(copy), [4, 5]);
  const bytes = ck.bytes('b.f32');
  t.same(Buffer.from(bytes), Buffer.from(random.buffer), 'bytes() are the raw data');

  // close(): views are detached, further use is refused, close is idempotent.
  ck.close();
  ck.close();
  t.equal(view.length, 0, 'views become empty after close');
  t.equal(bytes.length, 0);
  expectCode(t, () => ck.bytes('a.f32'), 'ST_CLOSED');
  expectCode(t, () => ck.float32('a.f32'), 'ST_CLOSED');
});

t.test('writer checks lengths and leaves no partial file', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'bad.safetensors');
  t.throws(
    () => writeSafetensors(file, [{ name: 'x', dtype: 'F32', shape: [2, 3] }], () => new Float32Array(5)),
    /needs 6 values, fill returned 5/,
  );
  t.throws(() => writeSafetensors(file, [{ name: 'x', dtype: 'F32', shape: [-1] }], () => new Float32Array(0)), /non-negative/);
  t.throws(
    () =>
      writeSafetensors(
        file,
        [
          { name: 'x', dtype: 'F32', shape: [1] },
          { name: 'x', dtype: 'F32', shape: [1] },
        ],
        () => new Float32Array(1),
      ),
    /duplicate/,
  );
  t.same(fs.readdirSync(dir), [], 'nothing left behind');
});

t.test('sharded directory with an index', async (t) => {
  const dir = tempDir(t);
  const mk = (n: number, v: number) => Float32Array.from({ length: n }, (_, i) => v + i);
  writeSafetensors(
    path.join(dir, 'model-00001-of-00002.safetensors'),
    [
      { name: 'model.embed_tokens.weight', dtype: 'BF16', shape: [4, 2] },
      { name: 'model.layers.0.mlp.gate.weight', dtype: 'F32', shape: [3] },
    ],
    (name) => (name.includes('embed') ? mk(8, 1) : mk(3, 10)),
    { format: 'pt' },
  );
  writeSafetensors(
    path.join(dir, 'model-00002-of-00002.safetensors'),
    [{ name: 'lm_head.weight', dtype: 'F16', shape: [2, 2] }],
    () => mk(4, 100),
    { format: 'pt', extra: 'x' },
  );
  const index = {
    metadata: { total_size: 36 },
    weight_map: {
      'model.embed_tokens.weight': 'model-00001-of-00002.safetensors',
      'model.layers.0.mlp.gate.weight': 'model-00001-of-00002.safetensors',
      'lm_head.weight': 'model-00002-of-00002.safetensors',
    },
  };
  fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify(index));
  const ck = SafetensorsCheckpoint.openDir(dir);
  t.teardown(() => ck.close());
  t.same(ck.names(), ['lm_head.weight', 'model.embed_tokens.weight', 'model.layers.0.mlp.gate.weight']);
  t.equal(ck.info('lm_head.weight').file, path.join(dir, 'model-00002-of-00002.safetensors'));
  t.same(Array.from(ck.float32('lm_head.weight')), [100, 101, 102, 103]);
  t.same(Array.from(ck.float32('model.embed_tokens.weight')), [1, 2, 3, 4, 5, 6, 7, 8]);
  t.same(Array.from(ck.float32('model.layers.0.mlp.gate.weight')), [10, 11, 12]);
  t.same(ck.metadata, { format: 'pt', extra: 'x' });
});

t.test('single-file directory and missing checkpoint', async (t) => {
  const dir = tempDir(t);
  expectCode(t, () => SafetensorsCheckpoint.openDir(dir), 'ST_INDEX');
  writeSafetensors(path.join(dir, 'model.safetensors'), [{ name: 'w', dtype: 'F32', shape: [2] }], () => Float32Array.of(1, 2));
  const ck = SafetensorsCheckpoint.openDir(dir);
  t.same(Array.from(ck.float32('w')), [1, 2]);
  ck.close();
});

// ---- Corrupt files: each gives its own code ---------------------------------------

const GOOD_ENTRY = { dtype: 'F32', shape: [2], data_offsets: [0, 8] };

t.test('corrupt files', async (t) => {
  const dir = tempDir(t);
  let n = 0;
  const open = (bytes: Buffer) => {
    const file = path.join(dir, `case-${n++}.safetensors`);
    fs.writeFileSync(file, bytes);
    return () => SafetensorsCheckpoint.openFile(file);
  };
  const cases: [string, Buffer, string, RegExp?][] = [
    ['empty file', Buffer.alloc(0), 'ST_TRUNCATED'],
    ['5-byte file', Buffer.from([1, 0, 0, 0, 0]), 'ST_TRUNCATED', /shorter than the 8-byte header length/],
    ['header length 0', rawFile('', 8, 0n), 'ST_HEADER_LENGTH', /header length is 0/],
    ['header length past end', rawFile({ w: GOOD_ENTRY }, 8, 1000n), 'ST_HEADER_LENGTH', /past the end/],
    ['header length absurd', rawFile('{}', 0, 200_000_000n), 'ST_HEADER_LENGTH', /exceeds the limit/],
    ['header length 2^64-1', rawFile('{}', 0, 0xffffffffffffffffn), 'ST_HEADER_LENGTH'],
    ['non-JSON header', rawFile('{"w": {dtype: "F32"}}', 8), 'ST_HEADER_JSON', /not valid JSON/],
    ['JSON array header', rawFile('[]'), 'ST_HEADER_JSON', /must be a JSON object, got array/],
    ['JSON string header', rawFile('"x"'), 'ST_HEADER_JSON'],
    ['trailing garbage', rawFile('{} x'), 'ST_HEADER_JSON'],
    ['bad UTF-8', rawFile(Buffer.concat([Buffer.from('{"a'), Buffer.from([0xff]), Buffer.from('": 1}')])), 'ST_HEADER_JSON', /UTF-8/],
    ['overlong UTF-8', rawFile(Buffer.concat([Buffer.from('{"a'), Buffer.from([0xc0, 0xaf]), Buffer.from('":{}}')])), 'ST_HEADER_JSON'],
    ['lone surrogate escape', rawFile('{"\\ud800": {}}'), 'ST_HEADER_JSON', /surrogate/],
    ['control char in string', rawFile('{"a\u0001": {}}'), 'ST_HEADER_JSON'],
    ['duplicate key', rawFile(`{"w": ${JSON.stringify(GOOD_ENTRY)}, "w": ${JSON.stringify(GOOD_ENTRY)}}`, 8), 'ST_HEADER_JSON', /duplicate key/],
    ['deep nesting', rawFile(`{"__metadata__": ${'['.repeat(10000)}${']'.repeat(10000)}}`), 'ST_HEADER_JSON', /nesting/],
    ['NUL padding', rawFile(Buffer.from('{}\0\0')), 'ST_HEADER_JSON'],
    ['missing dtype', rawFile({ w: { shape: [2], data_offsets: [0, 8] } }, 8), 'ST_BAD_ENTRY', /tensor "w": missing "dtype"/],
    ['missing shape', rawFile({ w: { dtype: 'F32', data_offsets: [0, 8] } }, 8), 'ST_BAD_ENTRY', /missing "shape"/],
    ['missing data_offsets', rawFile({ w: { dtype: 'F32', shape: [2] } }, 8), 'ST_BAD_ENTRY', /missing "data_offsets"/],
    ['dtype not a string', rawFile({ w: { ...GOOD_ENTRY, dtype: 4 } }, 8), 'ST_BAD_ENTRY'],
    ['extra key', rawFile({ w: { ...GOOD_ENTRY, stride: [1] } }, 8), 'ST_BAD_ENTRY', /unexpected key "stride"/],
    ['entry not an object', rawFile({ w: [1, 2] }, 8), 'ST_BAD_ENTRY'],
    ['shape not an array', rawFile({ w: { ...GOOD_ENTRY, shape: 2 } }, 8), 'ST_BAD_ENTRY'],
    ['negative shape', rawFile('{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', 8), 'ST_BAD_ENTRY'],
    ['float shape', rawFile('{"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', 8), 'ST_BAD_ENTRY'],
    ['metadata not an object', rawFile({ __metadata__: 'x', w: GOOD_ENTRY }, 8), 'ST_BAD_ENTRY', /__metadata__/],
    ['metadata value not a string', rawFile({ __metadata__: { a: 1 }, w: GOOD_ENTRY }, 8), 'ST_BAD_ENTRY', /__metadata__ value of "a"/],
    ['unknown dtype', rawFile({ w: { ...GOOD_ENTRY, dtype: 'F128' } }, 8), 'ST_DTYPE', /tensor "w": unknown dtype "F128"/],
    ['shape mismatch', rawFile({ w: { ...GOOD_ENTRY, shape: [3] } }, 8), 'ST_SHAPE_MISMATCH', /needs 12 bytes/],
    ['shape product overflows', rawFile({ w: { dtype: 'F32', shape: [2 ** 40, 2 ** 40], data_offsets: [0, 8] } }, 8), 'ST_SHAPE_MISMATCH', /overflows/],
    ['negative offset', rawFile('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}', 8), 'ST_BAD_ENTRY', /data_offsets/],
    ['float offset', rawFile('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.5]}}', 8), 'ST_BAD_ENTRY', /data_offsets/],
    ['exponent offset', rawFile('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8e0]}}', 8), 'ST_BAD_ENTRY'],
    ['offsets beyond 2^53', rawFile('{"w": {"dtype": "U8", "shape": [0], "data_offsets": [18446744073709551616, 18446744073709551616]}}'), 'ST_BAD_ENTRY'],
    ['one offset', rawFile({ w: { ...GOOD_ENTRY, data_offsets: [0] } }, 8), 'ST_BAD_ENTRY'],
    ['begin > end', rawFile({ w: { dtype: 'F32', shape: [0], data_offsets: [8, 0] } }, 8), 'ST_BAD_ENTRY', /begin 8 > end 0/],
    ['offsets past end', rawFile({ w: { dtype: 'F32', shape: [2], data_offsets: [8, 16] } }, 8), 'ST_OFFSET_RANGE', /tensor "w"/],
    [
      'overlap',
      rawFile({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, 12),
      'ST_OVERLAP',
      /tensor "b".*overlap tensor "a"/,
    ],
    [
      'identical ranges',
      rawFile({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } }, 8),
      'ST_OVERLAP',
    ],
    [
      'hole',
      rawFile({ a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, b: { dtype: 'F32', shape: [1], data_offsets: [8, 12] } }, 12),
      'ST_HOLE',
      /tensor "b".*\[4, 8\) belong to no tensor/,
    ],
    ['hole at the start', rawFile({ a: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, 8), 'ST_HOLE'],
    ['trailing bytes', rawFile({ w: GOOD_ENTRY }, 12), 'ST_HOLE', /cover only 8/],
  ];
  for (const [label, bytes, code, message] of cases) {
    t.test(label, async (t) => expectCode(t, open(bytes), code, message));
  }

  t.test('truncated data section', async (t) => {
    const file = path.join(dir, 'truncated-data.safetensors');
    writeSafetensors(file, [{ name: 'w', dtype: 'F32', shape: [16] }], () => new Float32Array(16));
    const full = fs.readFileSync(file);
    fs.writeFileSync(file, full.subarray(0, full.length - 5));
    expectCode(t, () => SafetensorsCheckpoint.openFile(file), 'ST_OFFSET_RANGE', /run past the end of the 59-byte data section/);
  });

  t.test('messages name the file and the tensor', async (t) => {
    const file = path.join(dir, 'named.safetensors');
    fs.writeFileSync(file, rawFile({ 'layers.3.w': { ...GOOD_ENTRY, dtype: 'Q4' } }, 8));
    try {
      SafetensorsCheckpoint.openFile(file);
      t.fail('should throw');
    } catch (e) {
      t.match((e as Error).message, file);
      t.match((e as Error).message, 'tensor "layers.3.w"');
    }
  });

  t.test('missing file and directory', async (t) => {
    expectCode(t, () => SafetensorsCheckpoint.openFile(path.join(dir, 'nope.safetensors')), 'ST_IO', /cannot open/);
    expectCode(t, () => SafetensorsCheckpoint.openFile(dir), 'ST_IO', /not a regular file/);
  });

  t.test('valid edge cases are accepted', async (t) => {
    const ok = (bytes: Buffer) => {
      const ck = open(bytes)();
      ck.close();
      return ck;
    };
    t.ok(ok(rawFile('{}')), 'no tensors, no data');
    t.ok(ok(rawFile('  {"__metadata__": {}}  ')), 'surrounding whitespace');
    t.ok(
      ok(rawFile({ z: { dtype: 'U8', shape: [0], data_offsets: [0, 0] }, w: GOOD_ENTRY, y: { dtype: 'BOOL', shape: [], data_offsets: [8, 9] } }, 9)),
      'zero-size tensor, scalar, any header order',
    );
    t.ok(ok(rawFile({ 'n\u00e9\ud83d\ude00': GOOD_ENTRY }, 8)), 'non-ASCII names');
    t.ok(ok(rawFile('{"\\u00e9\\ud83d\\ude00": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8)), 'escaped surrogate pair');
    for (const dtype of ['F64', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL', 'F8_E4M3', 'F8_E5M2']) {
      const size = { F64: 8, I64: 8, I32: 4, I16: 2 }[dtype as 'F64'] ?? 1;
      const ck = open(rawFile({ x: { dtype, shape: [3], data_offsets: [0, 3 * size] } }, 3 * size))();
      t.equal(ck.bytes('x').length, 3 * size, dtype);
      expectCode(t, () => ck.float32('x'), 'ST_CONVERT');
      ck.close();
    }
  });
});

// ---- Index problems --------------------------------------------------------------

t.test('index problems give ST_INDEX', async (t) => {
  const shardEntries: WriteEntry[] = [{ name: 'a', dtype: 'F32', shape: [1] }];
  const setup = (weightMap: unknown, rawIndex?: string) => {
    const dir = tempDir(t);
    writeSafetensors(path.join(dir, 's1.safetensors'), shardEntries, () => Float32Array.of(1));
    writeSafetensors(path.join(dir, 's2.safetensors'), [{ name: 'b', dtype: 'F32', shape: [1] }], () => Float32Array.of(2));
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), rawIndex ?? JSON.stringify({ weight_map: weightMap }));
    return dir;
  };
  const cases: [string, string, RegExp][] = [
    ['bad index JSON', setup(null, '{"weight_map": {'), /cannot read JSON/],
    ['index is an array', setup(null, '[]'), /not a JSON object/],
    ['no weight_map', setup(null, '{"metadata": {}}'), /weight_map/],
    ['shard not a string', setup({ a: 1, b: 's2.safetensors' }), /shard must be a non-empty file name/],
    ['missing shard', setup({ a: 's1.safetensors', b: 's3.safetensors' }), /"s3.safetensors" does not exist/],
    ['shard path with ../', setup({ a: 's1.safetensors', b: '../s2.safetensors' }), /outside the checkpoint directory/],
    ['absolute shard path', setup({ a: 's1.safetensors', b: '/etc/passwd' }), /outside the checkpoint directory/],
    ['tensor absent from its shard', setup({ a: 's1.safetensors', b: 's2.safetensors', c: 's2.safetensors' }), /"c" is listed for s2.safetensors but that shard does not contain it/],
    ['tensor listed for the wrong shard', setup({ a: 's2.safetensors', b: 's2.safetensors' }), /"a" is listed for s2.safetensors but that shard does not contain it/],
  ];
  for (const [label, dir, message] of cases) {
    t.test(label, async (t) => expectCode(t, () => SafetensorsCheckpoint.openDir(dir), 'ST_INDEX', message));
  }

  t.test('tensor in a shard but not in the index', async (t) => {
    const dir = setup({ a: 's1.safetensors' });
    writeSafetensors(
      path.join(dir, 's1.safetensors'),
      [...shardEntries, { name: 'x', dtype: 'F32', shape: [1] }],
      () => Float32Array.of(1),
    );
    expectCode(t, () => SafetensorsCheckpoint.openDir(dir), 'ST_INDEX', /"x" in s1.safetensors is not listed in weight_map/);
  });

  t.test('tensor present in two shards', async (t) => {
    const dir = tempDir(t);
    writeSafetensors(path.join(dir, 's1.safetensors'), shardEntries, () => Float32Array.of(1));
    writeSafetensors(path.join(dir, 's2.safetensors'), shardEntries, () => Float32Array.of(1));
    fs.writeFileSync(
      path.join(dir, 'model.safetensors.index.json'),
      JSON.stringify({ weight_map: { a: 's1.safetensors', b: 's2.safetensors' } }),
    );
    expectCode(t, () => SafetensorsCheckpoint.openDir(dir), 'ST_INDEX', /"a" is present in both s1.safetensors and s2.safetensors/);
  });

  t.test('a corrupt shard reports its own code', async (t) => {
    const dir = setup({ a: 's1.safetensors', b: 's2.safetensors' });
    fs.writeFileSync(path.join(dir, 's2.safetensors'), rawFile({ b: GOOD_ENTRY }, 12));
    expectCode(t, () => SafetensorsCheckpoint.openDir(dir), 'ST_HOLE', /s2.safetensors/);
  });
});

// ---- Mapping lifetime ------------------------------------------------------------

t.test('mappings: close + GC never double-unmaps, GC alone unmaps', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'life.safetensors');
  writeSafetensors(file, [{ name: 'w', dtype: 'F32', shape: [1024] }], () => Float32Array.from({ length: 1024 }, (_, i) => i));
  const script = path.join(dir, 'child.cjs');
  fs.writeFileSync(
    script,
    `
    const fs = require('node:fs');
    const a = require(${JSON.stringify(nativeAddonPath())});
    const file = ${JSON.stringify(file)};
    const mapped = () => fs.readFileSync('/proc/self/maps', 'utf8').split('\\n').filter((l) => l.endsWith(file)).length;
    const sum = (r) => new Float32Array(r.buffer, r.dataOffset, 1024).reduce((s, x) => s + x, 0);
    // 1. close() then drop: the finalizer runs later and must not unmap again.
    for (let i = 0; i < 200; i++) { const r = a.safetensorsOpen(file); if (sum(r) !== 523776) throw new Error('bad data'); r.handle.close(); r.handle.close(); }
    const afterClose = mapped();
    // 2. dropped without close: GC unmaps.
    for (let i = 0; i < 50; i++) { const r = a.safetensorsOpen(file); sum(r); }
    // 3. handle kept, buffer dropped: still mapped until close.
    const kept = a.safetensorsOpen(file);
    const keptHandle = kept.handle;
    delete kept.buffer;
    global.gc(); global.gc();
    setTimeout(() => {
      global.gc();
      setTimeout(() => {
        const live = mapped();
        keptHandle.close();
        const r = a.safetensorsOpen(file);
        const ok = sum(r) === 523776;
        process.stdout.write(JSON.stringify({ afterClose, live, afterKeptClose: mapped() - 1, ok, closed: keptHandle.closed, len: keptHandle.byteLength }));
      }, 50);
    }, 50);
    `,
  );
  const r = spawnSync(process.execPath, ['--expose-gc', script], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as Record<string, unknown>;
  t.equal(out.afterClose, 0, 'close() unmaps at once');
  t.ok((out.live as number) <= 1, `GC released dropped mappings (${String(out.live)} left, the kept handle's)`);
  t.equal(out.afterKeptClose, 0, 'closing the kept handle unmaps it');
  t.equal(out.ok, true, 'later opens read correct data');
  t.equal(out.closed, true);
  t.equal(out.len, 0);
});
