// Matrix kernels: weight formats (byte-exact ggml Q8_0 / Q4_0 blocks, F16 / BF16 rounding),
// activation quantization, every ISA variant this CPU runs against the scalar reference
// and against a float64 dot product, and the thread pool.
import t from 'tap';
import { loadNative, type KernelIsa, type WeightType } from '../src/engine/native.js';
import { quantizeQ4_0, quantizeQ8_0 } from '../src/model/gguf-writer.js';

const addon = loadNative();
const ALL_ISAS: KernelIsa[] = ['scalar', 'avx2', 'avx512'];
const TYPES: WeightType[] = ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'];
const initialIsa = addon.kernelInfo().active;
t.teardown(() => {
  addon.setIsa(initialIsa);
});

/** The ISAs this machine can run; setIsa leaves the active one unchanged when it returns false. */
function runnableIsas(): KernelIsa[] {
  const out: KernelIsa[] = [];
  for (const isa of ALL_ISAS) if (addon.setIsa(isa)) out.push(isa);
  addon.setIsa(initialIsa);
  return out;
}
const ISAS = runnableIsas();

/** Deterministic pseudo-random numbers (mulberry32), roughly normal by summing uniforms. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  const u = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
  return () => u() + u() + u() - 1.5;
}
function randomMatrix(seed: number, len: number, scale = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(len);
  for (let i = 0; i < len; i++) out[i] = r() * scale;
  // A few outliers, as in real activations and weights.
  for (let i = 0; i < len; i += 97) out[i] *= 8;
  return out;
}

function rowBytes(type: WeightType, cols: number): number {
  switch (type) {
    case 'f32':
      return cols * 4;
    case 'f16':
    case 'bf16':
      return cols * 2;
    case 'q8_0':
      return (cols / 32) * 34;
    case 'q4_0':
      return (cols / 32) * 18;
  }
}

function dequantizeAll(type: WeightType, bytes: Uint8Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols);
  const rb = rowBytes(type, cols);
  for (let r = 0; r < rows; r++) out.set(addon.dequantizeRow(type, bytes.subarray(r * rb, (r + 1) * rb), cols), r * cols);
  return out;
}

// ---- Independent JS definitions -------------------------------------------------------

const f32 = Math.fround;

/** float32 -> binary16 bits, round to nearest even (written from the IEEE definition). */
function f16Bits(v: number): number {
  v = f32(v);
  const sign = v < 0 || Object.is(v, -0) ? 0x8000 : 0;
  const a = Math.abs(v);
  if (Number.isNaN(v)) return 0x7e00;
  if (a === Infinity) return sign | 0x7c00;
  const roundEven = (x: number) => {
    const f = Math.floor(x);
    const rem = x - f;
    return rem > 0.5 || (rem === 0.5 && f % 2 === 1) ? f + 1 : f;
  };
  if (a < 2 ** -14) return sign | roundEven(a / 2 ** -24); // subnormal (may round up to 0x0400)
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  if (2 ** (e + 1) <= a) e++;
  let m = roundEven((a / 2 ** e - 1) * 1024);
  if (m === 1024) {
    m = 0;
    e++;
  }
  if (e > 15) return sign | 0x7c00;
  return sign | ((e + 15) << 10) | m;
}
function f16Value(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}
/** C's roundf: half away from zero. */
const roundAway = (v: number) => Math.sign(v) * Math.floor(Math.abs(v) + 0.5);

/** ggml quantize_row_q8_0 for one block, independent of the native code. */
function refQ8Block(x: Float32Array): Uint8Array {
  let amax = 0;
  for (const v of x) amax = Math.max(amax, Math.abs(v));
  const d = f32(amax / 127);
  const id = d ? f32(1 / d) : 0;
  const out = new Uint8Array(34);
  const h = f16Bits(d);
  out[0] = h & 0xff;
  out[1] = h >> 8;
  for (let j = 0; j < 32; j++) out[2 + j] = roundAway(f32(x[j] * id)) & 0xff;
  return out;
}
/** ggml quantize_row_q4_0 for one block. */
function refQ4Block(x: Float32Array): Uint8Array {
  let amax = 0;
  let max = 0;
  for (const v of x) {
    if (amax < Math.abs(v)) {
      amax = Math.abs(v);
      max = v;
    }
  }
  const d = f32(max / -8);
  const id = d ? f32(1 / d) : 0;
  const out = new Uint8Array(18);
  const h = f16Bits(d);
  out[0] = h & 0xff;
  out[1] = h >> 8;
  const q = (v: number) => Math.min(15, Math.trunc(f32(f32(v * id) + 8.5)));
  for (let j = 0; j < 16; j++) out[2 + j] = q(x[j]) | (q(x[16 + j]) << 4);
  return out;
}

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

// ---- Formats --------------------------------------------------------------------------

t.test('kernelInfo and setIsa', async (t) => {
  const info = addon.kernelInfo();
  t.ok(ALL_ISAS.includes(info.best), `best ${info.best}`);
  t.ok(ALL_ISAS.includes(info.active), `active ${info.active}`);
  t.type(info.vnni, 'boolean');
  t.type(info.bf16, 'boolean');
  t.type(info.amx, 'boolean');
  t.type(info.amxStatus, 'string');
  if (!addon.cpuFeatures().amxInt8) {
    t.equal(info.amx, false, 'no AMX on this CPU: not in use');
    // (Or, under MOE_SERVE_ISA=avx2|scalar on an AVX-512 CPU, not used by the active kernels.)
    t.match(info.amxStatus, /not supported by this CPU|not used: the active kernels/, `status: ${info.amxStatus}`);
  } else {
    t.comment(`AMX: ${info.amxStatus}`);
    if (info.amx) t.match(info.amxStatus, /^in use/);
  }
  t.ok(ISAS.includes('scalar') && ISAS.includes(info.best), `runnable: ${ISAS.join(', ')}`);
  t.throws(() => addon.setIsa('sse9' as KernelIsa), /scalar avx2 avx512/);
  t.equal(addon.kernelInfo().active, initialIsa, 'a refused name changes nothing');
});

t.test('int8 MAC peak probe: each ISA runs its own instructions, bad arguments are refused', async (t) => {
  // MACs of one round of one thread (2^16 iterations): AVX2 4 chains x 32 (vpmaddubsw +
  // vpmaddwd), AVX-512 12 chains x 64 with VNNI (vpdpbusd), else 4 x 64, scalar 32
  // (32-weight block dot products over 1 KiB rows).
  const vnni = addon.kernelInfo().vnni;
  const perRound: Record<KernelIsa, number> = { avx2: 65536 * 4 * 32, avx512: 65536 * (vnni ? 12 : 4) * 64, scalar: 65536 * 32 };
  for (const isa of ISAS) {
    addon.setIsa(isa);
    for (const threads of [1, 2]) {
      const r = addon.macPeakBench(threads, 0.02);
      t.ok(r.seconds >= 0.02, `${isa}, ${threads} thread(s): ran ${r.seconds.toFixed(3)} s`);
      t.ok(r.macs >= threads * perRound[isa], `${isa}, ${threads} thread(s): at least one round per thread (${r.macs} MACs)`);
      t.equal(r.macs % (threads * perRound[isa]), 0, `${isa}: whole rounds of ${isa}'s probe on every thread`);
    }
  }
  // The Q4_0 token-group mix: AVX2 has its own (4 chains x 128: four vpmaddubsw per
  // vpmaddwd); the other ISAs' Q4_0 kernels use their default mix, and so does the probe.
  const perRoundQ4: Record<KernelIsa, number> = { ...perRound, avx2: 65536 * 4 * 128 };
  for (const isa of ISAS) {
    addon.setIsa(isa);
    const r = addon.macPeakBench(2, 0.02, 'q4_0');
    t.ok(r.macs >= 2 * perRoundQ4[isa] && r.macs % (2 * perRoundQ4[isa]) === 0, `${isa}: whole rounds of the q4_0 mix's probe (${r.macs} MACs)`);
    t.equal(addon.macPeakBench(1, 0.02, 'q8_0').macs % perRound[isa], 0, `${isa}: "q8_0" is the default probe`);
  }
  addon.setIsa(initialIsa);
  t.throws(() => addon.macPeakBench(0, 0.1), /threads/);
  t.throws(() => addon.macPeakBench(1, 0), /seconds/);
  t.throws(() => addon.macPeakBench(1, Number.NaN), /seconds/);
  t.throws(() => addon.macPeakBench(1, 61), /seconds/);
  t.throws(() => addon.macPeakBench(1, 0.01, 'q5_0' as 'q4_0'), /mix must be "q8_0" or "q4_0", got "q5_0"/);
  t.throws(() => addon.macPeakBench(1, 0.01, 4 as unknown as 'q4_0'), /mix must be/);
});

// Quantization at load runs through the active ISA (AVX-512 packs blocks with vector
// code): every one must give the scalar definition's bytes.
function eachIsa(t: { teardown(fn: () => void): void }, fn: (isa: KernelIsa) => void): void {
  for (const isa of ISAS) {
    addon.setIsa(isa);
    fn(isa);
  }
  addon.setIsa(initialIsa);
}

t.test('Q8_0 blocks: hand-computed bytes', async (t) => eachIsa(t, (isa) => {
  // amax 127 -> d = 1 (f16 0x3c00), q = roundf(x): halves round away from zero.
  const x = new Float32Array(32);
  x.set([127, -127, 0.5, -0.5, 1.5, 2.5, -2.5, 3.49, 0.49999997, -126.5, 7, 0]);
  const got = addon.quantizeRows('q8_0', x, 1, 32);
  const want = new Uint8Array(34);
  want.set([0x00, 0x3c, 0x7f, 0x81, 0x01, 0xff, 0x02, 0x03, 0xfd, 0x03, 0x00, 0x81, 0x07, 0x00]);
  t.equal(hex(got), hex(want), `${isa}: halves away from zero`);
  // All zero: d = 0, q = 0.
  t.equal(hex(addon.quantizeRows('q8_0', new Float32Array(32), 1, 32)), '00'.repeat(34), `${isa}: all zero`);
  // amax 16: d = 16/127 -> f16 0x3008, q = roundf(x * (1/d)).
  const y = new Float32Array(32).map((_, j) => j - 16);
  const gy = addon.quantizeRows('q8_0', y, 1, 32);
  t.equal(gy[0] | (gy[1] << 8), 0x3008, `${isa}: f16 scale`);
  t.equal((gy[2] << 24) >> 24, -127, `${isa}: x = -16 -> -127`);
  t.equal(hex(gy), hex(refQ8Block(y)), `${isa}: reference bytes`);
}));

t.test('Q4_0 blocks: hand-computed bytes', async (t) => eachIsa(t, (isa) => {
  // max = -8 (first of the largest magnitude; +8 comes later) -> d = 1, q = min(15, trunc(x + 8.5)).
  const x = new Float32Array(32);
  x.set([-8, 8, 7.6, 0, -0.5, 0.5, 1.4999, -7.6]);
  x[16] = 3;
  x[17] = -3;
  const q = [0, 15, 15, 8, 8, 9, 9, 0];
  const want = new Uint8Array(18);
  want[0] = 0x00;
  want[1] = 0x3c;
  for (let j = 0; j < 16; j++) want[2 + j] = (q[j] ?? 8) | ((j === 0 ? 11 : j === 1 ? 5 : 8) << 4);
  t.equal(hex(addon.quantizeRows('q4_0', x, 1, 32)), hex(want), `${isa}: first of the largest magnitude`);
  // Positive max 4 -> d = -0.5 (0xb800): x = 4 -> 0, x = -4 -> 16.5 -> 15, x = 1 -> 6.
  const y = new Float32Array(32);
  y.set([4, -4, 1]);
  const gy = addon.quantizeRows('q4_0', y, 1, 32);
  t.equal(gy[0] | (gy[1] << 8), 0xb800, `${isa}: negative scale`);
  t.same([gy[2] & 15, gy[3] & 15, gy[4] & 15, gy[5] & 15, gy[2] >> 4], [0, 15, 6, 8, 8], `${isa}: clamped at 15`);
  t.equal(hex(addon.quantizeRows('q4_0', new Float32Array(32), 1, 32)), '0080' + '88'.repeat(16), `${isa}: all zero (scale -0)`);
  // All -0: still the scale -0 of max = +0, not of the first -0.
  t.equal(hex(addon.quantizeRows('q4_0', new Float32Array(32).fill(-0), 1, 32)), '0080' + '88'.repeat(16), `${isa}: all -0`);
}));

t.test('Q8_0 / Q4_0 match an independent ggml definition on random rows', async (t) => eachIsa(t, (isa) => {
  const cols = 4096;
  const x = randomMatrix(7, 4 * cols, 0.05);
  for (const type of ['q8_0', 'q4_0'] as const) {
    const bytes = addon.quantizeRows(type, x, 4, cols);
    const bb = type === 'q8_0' ? 34 : 18;
    let bad = 0;
    for (let b = 0; b < (4 * cols) / 32; b++) {
      const blk = x.subarray(32 * b, 32 * b + 32);
      const want = type === 'q8_0' ? refQ8Block(blk) : refQ4Block(blk);
      if (hex(bytes.subarray(bb * b, bb * b + bb)) !== hex(want)) bad++;
    }
    t.equal(bad, 0, `${isa} ${type}: every block byte-identical`);
  }
}));

t.test('Q8_0 / Q4_0 edge blocks: ties, halves, repeated maxima and non-finite values, every ISA as the scalar code', async (t) => {
  const blocks: number[][] = [];
  // Values on the rounding boundaries of small integer scales (d = 1, 2, 0.5: x * id lands on k + 0.5).
  for (const amax of [127, 254, 63.5, 8, 16, 4]) {
    blocks.push(Array.from({ length: 32 }, (_, j) => (j === 0 ? amax : ((j % 2 ? -1 : 1) * (j + 0.5) * amax) / 127)));
  }
  // The largest magnitude repeated with both signs, first positive then first negative.
  blocks.push(Array.from({ length: 32 }, (_, j) => (j === 5 ? 3 : j === 20 ? -3 : j / 16)));
  blocks.push(Array.from({ length: 32 }, (_, j) => (j === 5 ? -3 : j === 20 ? 3 : j / 16)));
  blocks.push(Array.from({ length: 32 }, (_, j) => (j === 31 ? -1e-30 : 0))); // tiny maximum in the last lane
  blocks.push(Array.from({ length: 32 }, (_, j) => (j === 3 ? NaN : j - 10))); // NaN: the scalar definition decides
  blocks.push(Array.from({ length: 32 }, (_, j) => (j === 7 ? Infinity : j)));
  blocks.push(Array.from({ length: 32 }, (_, j) => (j === 0 ? -Infinity : 1)));
  blocks.push(Array.from({ length: 32 }, (_, j) => 3.4e38 * (j % 3 === 0 ? -1 : 1))); // near FLT_MAX
  const x = Float32Array.from(blocks.flat());
  for (const type of ['q8_0', 'q4_0'] as const) {
    addon.setIsa('scalar');
    const want = addon.quantizeRows(type, x, blocks.length, 32);
    for (const isa of ISAS) {
      addon.setIsa(isa);
      t.equal(hex(addon.quantizeRows(type, x, blocks.length, 32)), hex(want), `${isa} ${type}: ${blocks.length} edge blocks as the scalar code`);
    }
    addon.setIsa(initialIsa);
    // 24576 random blocks: normal values, and small multiples of 1/8 (products on rounding
    // boundaries), at magnitudes from 1e-6 to 1e6.
    const r = rng(99);
    const many = new Float32Array(24576 * 32);
    for (let i = 0; i < many.length; i++) {
      const scale = 10 ** (Math.floor(i / (32 * 1024)) % 13 - 6);
      many[i] = (i >> 5) % 2 ? r() * scale : (Math.round(r() * 64) / 8) * scale;
    }
    addon.setIsa('scalar');
    const wantMany = addon.quantizeRows(type, many, 24576, 32);
    for (const isa of ISAS) {
      addon.setIsa(isa);
      t.ok(Buffer.from(addon.quantizeRows(type, many, 24576, 32)).equals(Buffer.from(wantMany)), `${isa} ${type}: 24576 random blocks as the scalar code`);
    }
    addon.setIsa(initialIsa);
    // The GGUF writer's quantizers (TypeScript) write the bytes the engine packs, into a
    // fresh array or the front of a larger reused one.
    const js = type === 'q8_0' ? quantizeQ8_0 : quantizeQ4_0;
    t.ok(Buffer.from(js(many)).equals(Buffer.from(wantMany)), `GGUF writer ${type}: 24576 random blocks as the addon`);
    const reused = new Uint8Array(want.length + 100).fill(0xee);
    const jsEdge = js(x, reused);
    t.equal(reused[want.length], 0xee, `GGUF writer ${type}: nothing written past the tensor`);
    // Except for a NaN in a Q8_0 block (a corrupt tensor): ggml's MAX() drops it, the
    // writer's Math.max keeps it (scale NaN).
    const bbw = type === 'q8_0' ? 34 : 18;
    const same = blocks.filter((blk, b) => (type === 'q4_0' || !blk.some(Number.isNaN)) && hex(jsEdge.subarray(bbw * b, bbw * b + bbw)) === hex(want.subarray(bbw * b, bbw * b + bbw))).length;
    t.equal(same, blocks.length - (type === 'q8_0' ? 1 : 0), `GGUF writer ${type}: the edge blocks as the addon`);
    t.throws(() => js(x, new Uint8Array(want.length - 1)), /smaller/, `GGUF writer ${type}: a short output buffer is refused`);
    // And the finite ones as the independent definition.
    const bb = type === 'q8_0' ? 34 : 18;
    for (let b = 0; b < 7; b++) {
      const blk = x.subarray(32 * b, 32 * b + 32);
      t.equal(hex(want.subarray(bb * b, bb * b + bb)), hex(type === 'q8_0' ? refQ8Block(blk) : refQ4Block(blk)), `${type} edge block ${b}`);
    }
  }
});

t.test('quantization round trip within the format bound', async (t) => {
  const cols = 1024;
  const x = randomMatrix(11, 8 * cols, 0.1);
  for (const type of ['q8_0', 'q4_0'] as const) {
    const bytes = addon.quantizeRows(type, x, 8, cols);
    const back = dequantizeAll(type, bytes, 8, cols);
    const bb = type === 'q8_0' ? 34 : 18;
    let worst = 0;
    for (let b = 0; b < (8 * cols) / 32; b++) {
      const blk = x.subarray(32 * b, 32 * b + 32);
      const d16 = f16Value(bytes[bb * b] | (bytes[bb * b + 1] << 8));
      let amax = 0;
      let max = 0;
      for (const v of blk) if (Math.abs(v) > amax) [amax, max] = [Math.abs(v), v];
      // d as quantization used it (f32) vs the stored f16 scale: the second term of the bound.
      const d = type === 'q8_0' ? f32(amax / 127) : f32(max / -8);
      const qmax = type === 'q8_0' ? 127 : 8;
      for (let j = 0; j < 32; j++) {
        const err = Math.abs(blk[j] - back[32 * b + j]);
        // Q8_0: <= d/2. Q4_0: <= |d|/2, except the value clamped to 15 (x/d > 7.5): <= |d|.
        const clamped = type === 'q4_0' && blk[j] / d > 7.5;
        const bound = (clamped ? 1 : 0.5) * Math.abs(d) + qmax * Math.abs(d - d16) + 1e-7 * amax;
        worst = Math.max(worst, err / bound);
      }
    }
    t.ok(worst <= 1, `${type}: worst error / bound = ${worst.toFixed(3)}`);
  }
});

t.test('F16 rounding of special values', async (t) => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [65504, 0x7bff],
    [65519.99, 0x7bff],
    [65520, 0x7c00], // halfway to 2^16 rounds to infinity
    [1e6, 0x7c00],
    [-Infinity, 0xfc00],
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // tie -> even (0)
    [3 * 2 ** -25, 0x0002], // tie -> even (2)
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -14 - 2 ** -25, 0x0400], // subnormal rounding up into the normals
    [1 + 2 ** -11, 0x3c00], // tie -> even
    [1 + 3 * 2 ** -11, 0x3c02], // tie -> even (up)
    [1 + 2 ** -11 + 2 ** -20, 0x3c01],
    [0.1, 0x2e66],
  ];
  const x = Float32Array.from(cases.map((c) => c[0]));
  const got = addon.quantizeRows('f16', x, 1, x.length);
  const bits = new Uint16Array(got.buffer, got.byteOffset, x.length);
  for (let i = 0; i < cases.length; i++) {
    t.equal(bits[i], cases[i][1], `f16(${cases[i][0]}) = 0x${cases[i][1].toString(16)}`);
    t.equal(bits[i], f16Bits(cases[i][0]), 'matches the JS definition');
  }
  const nan = addon.quantizeRows('f16', Float32Array.of(NaN), 1, 1);
  const nanBits = nan[0] | (nan[1] << 8);
  t.ok((nanBits & 0x7c00) === 0x7c00 && (nanBits & 0x3ff) !== 0, 'NaN stays NaN');
  const back = addon.dequantizeRow('f16', got, x.length);
  t.equal(back[0], 0);
  t.ok(Object.is(back[1], -0), '-0 survives');
  t.equal(back[6], Infinity);
  t.equal(back[9], 2 ** -24);
  t.ok(Number.isNaN(addon.dequantizeRow('f16', nan, 1)[0]));
  // Random values: the JS definition agrees everywhere.
  const r = randomMatrix(3, 4096, 100);
  const rb = new Uint16Array(addon.quantizeRows('f16', r, 1, 4096).buffer);
  let bad = 0;
  for (let i = 0; i < 4096; i++) if (rb[i] !== f16Bits(r[i])) bad++;
  t.equal(bad, 0, 'random values');
});

t.test('BF16 rounding of special values', async (t) => {
  const cases: [number, number][] = [
    [1, 0x3f80],
    [-0, 0x8000],
    [1 + 2 ** -8, 0x3f80], // tie -> even
    [1 + 3 * 2 ** -8, 0x3f82], // tie -> even (up)
    [1 + 2 ** -8 + 2 ** -20, 0x3f81],
    [Infinity, 0x7f80],
    [3.4028234663852886e38, 0x7f80], // FLT_MAX rounds to infinity
    [1e-40, 0x0001], // subnormals are kept
    [-3.140625, 0xc049],
  ];
  const x = Float32Array.from(cases.map((c) => c[0]));
  const got = addon.quantizeRows('bf16', x, 1, x.length);
  const bits = new Uint16Array(got.buffer, got.byteOffset, x.length);
  for (let i = 0; i < cases.length; i++) t.equal(bits[i], cases[i][1], `bf16(${cases[i][0]})`);
  const nan = addon.quantizeRows('bf16', Float32Array.of(NaN), 1, 1);
  t.ok(Number.isNaN(addon.dequantizeRow('bf16', nan, 1)[0]), 'NaN stays NaN');
  t.same(Array.from(addon.dequantizeRow('bf16', got, 2)), [1, -0]);
  // The activations of the bf16 kernels are rounded the same way, in every ISA.
  for (const isa of ISAS) {
    addon.setIsa(isa);
    const a = addon.actsDequantize('bf16', x, 1, x.length);
    t.same(Array.from(a.subarray(0, 6)), [1, -0, 1, 1 + 2 ** -6, 1 + 2 ** -7, Infinity], `${isa} activations`);
  }
  addon.setIsa(initialIsa);
});

t.test('activation quantization: int8 per 32-block, same bytes in every ISA', async (t) => {
  const cols = 256;
  const n = 3;
  const x = randomMatrix(5, n * cols, 2);
  x.fill(0, 32, 64); // an all-zero block
  // Independent definition: d = amax / 127, q = round-to-nearest-even(x * (127 / amax)).
  const want = new Float32Array(n * cols);
  for (let b = 0; b < (n * cols) / 32; b++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[32 * b + j]));
    const id = amax ? f32(127 / amax) : 0;
    const d = f32(amax / 127);
    for (let j = 0; j < 32; j++) {
      const v = f32(x[32 * b + j] * id);
      let q = Math.round(v);
      if (q - v === 0.5 && q % 2 !== 0) q -= 1; // Math.round rounds .5 up; make it even
      want[32 * b + j] = f32(q * d);
    }
  }
  for (const isa of ISAS) {
    addon.setIsa(isa);
    for (const type of ['q8_0', 'q4_0'] as const) {
      const got = addon.actsDequantize(type, x, n, cols);
      let bad = 0;
      for (let i = 0; i < n * cols; i++) if (got[i] !== want[i]) bad++;
      t.equal(bad, 0, `${isa} ${type}`);
    }
  }
  addon.setIsa(initialIsa);
});

// ---- Matmul ---------------------------------------------------------------------------

interface Case {
  rows: number;
  cols: number;
  n: number;
}

function cases(type: WeightType): Case[] {
  const rowsList = [1, 3, 17, 65];
  const colsList = type === 'q8_0' || type === 'q4_0' ? [32, 64, 96, 160, 544, 1024, 4096] : [7, 33, 32, 100, 544, 4096];
  const nList = [1, 2, 3, 4, 5, 7, 8, 9, 11, 13, 16, 17, 31, 40];
  const out: Case[] = [];
  let k = 0;
  for (const rows of rowsList) {
    for (const cols of colsList) {
      if (cols === 4096 && rows === 65) continue; // keep the suite fast; 4096 is covered below 65 rows
      for (let j = 0; j < 2; j++) out.push({ rows, cols, n: nList[k++ % nList.length] });
    }
  }
  out.push({ rows: 65, cols: type === 'q8_0' || type === 'q4_0' ? 2048 : 1000, n: 40 });
  out.push({ rows: 5, cols: 4096, n: 40 });
  // Rows of 6 KB or more at n = 1 (one row per tile in the AVX-512 Q8_0 / Q4_0 kernel).
  const long = type === 'q4_0' ? 11008 : 8192;
  out.push({ rows: 3, cols: long, n: 1 }, { rows: 4, cols: long, n: 1 });
  // One-row tiles take four blocks per iteration (every Q8_0 row with one token, Q4_0 rows
  // of 6 KB or more): block counts of each remainder mod 4 after them, and short rows.
  const wide = type === 'q4_0' ? 11008 : 2048;
  for (const extra of [1, 2, 3]) out.push({ rows: 3, cols: wide + 32 * extra, n: 1 });
  for (const cols of [64, 96, 128, 160]) out.push({ rows: 5, cols, n: 1 });
  return out;
}

for (const type of TYPES) {
  t.test(`matmul ${type}: every ISA vs scalar and vs a float64 dot product`, async (t) => {
    let seed = 100;
    let worstScalar = 0;
    let worstF64 = 0;
    let checked = 0;
    for (const c of cases(type)) {
      const w = randomMatrix(seed++, c.rows * c.cols, 0.05);
      const x = randomMatrix(seed++, c.n * c.cols, 1);
      const bytes = addon.quantizeRows(type, w, c.rows, c.cols);
      const wd = dequantizeAll(type, bytes, c.rows, c.cols);
      addon.setIsa('scalar');
      const xd = addon.actsDequantize(type, x, c.n, c.cols);
      // float64 reference over the values the kernels multiply, and the scale of the
      // sum (sum of |terms|) that float rounding errors are proportional to.
      const ref = new Float64Array(c.n * c.rows);
      const mag = new Float64Array(c.n * c.rows);
      for (let tk = 0; tk < c.n; tk++) {
        for (let r = 0; r < c.rows; r++) {
          let s = 0;
          let m = 0;
          for (let k = 0; k < c.cols; k++) {
            const p = wd[r * c.cols + k] * xd[tk * c.cols + k];
            s += p;
            m += Math.abs(p);
          }
          ref[tk * c.rows + r] = s;
          mag[tk * c.rows + r] = m;
        }
      }
      const scalar = addon.matmulTest(type, bytes, c.rows, c.cols, x, c.n, 1);
      for (const isa of ISAS) {
        addon.setIsa(isa);
        const y = isa === 'scalar' ? scalar : addon.matmulTest(type, bytes, c.rows, c.cols, x, c.n, 2);
        for (let i = 0; i < y.length; i++) {
          const m = mag[i] + 1e-30;
          worstScalar = Math.max(worstScalar, Math.abs(y[i] - scalar[i]) / m);
          worstF64 = Math.max(worstF64, Math.abs(y[i] - ref[i]) / m);
        }
        checked++;
      }
    }
    addon.setIsa(initialIsa);
    // Every variant computes the same products (exact int32 block dot products for
    // q8_0 / q4_0; products of the same float / f16 / bf16 values otherwise); only the
    // order of the float32 additions differs, whose error is a few float32 ulps of the
    // sum of |terms| (2^-24 ~ 6e-8 per addition, partly cancelling): hence 1e-5 of sum|terms|.
    t.ok(worstScalar <= 1e-5, `vs scalar: worst |diff| / sum|terms| = ${worstScalar.toExponential(2)} (${checked} runs)`);
    t.ok(worstF64 <= 1e-5, `vs float64: worst |diff| / sum|terms| = ${worstF64.toExponential(2)}`);
  });
}

/**
 * A random Q8_0 product (weights rows x cols, n tokens): the weights' bytes, the inputs,
 * the values the kernels multiply (dequantized), and the scalar kernel's outputs.
 */
function q8Case(seed: number, rows: number, cols: number, n: number) {
  const w = randomMatrix(seed, rows * cols, 0.05);
  const x = randomMatrix(seed + 1, n * cols, 1);
  const bytes = addon.quantizeRows('q8_0', w, rows, cols);
  const wd = dequantizeAll('q8_0', bytes, rows, cols);
  addon.setIsa('scalar');
  const xd = addon.actsDequantize('q8_0', x, n, cols);
  const scalar = addon.matmulTest('q8_0', bytes, rows, cols, x, n, 1);
  addon.setIsa(initialIsa);
  return { bytes, x, wd, xd, scalar };
}

/**
 * Q8_0 matmuls of every ISA against the scalar kernel over rows × {32, 96, 2048} columns ×
 * token counts (`skip` leaves out large cases to keep the suite fast): the worst
 * |difference| relative to the sum of the absolute products of each output.
 */
function q8AgainstScalar(seed: number, rowCounts: number[], tokenCounts: number[], skip: (rows: number, cols: number, n: number) => boolean) {
  let worst = 0;
  let checked = 0;
  for (const rows of rowCounts) {
    for (const cols of [32, 96, 2048]) {
      for (const n of tokenCounts) {
        if (skip(rows, cols, n)) continue;
        const { bytes, x, wd, xd, scalar } = q8Case(seed, rows, cols, n);
        seed += 2;
        for (const isa of ISAS) {
          if (isa === 'scalar') continue;
          addon.setIsa(isa);
          const y = addon.matmulTest('q8_0', bytes, rows, cols, x, n, 2);
          for (let tk = 0; tk < n; tk++) {
            for (let r = 0; r < rows; r++) {
              let m = 1e-30;
              for (let k = 0; k < cols; k++) m += Math.abs(wd[r * cols + k] * xd[tk * cols + k]);
              const i = tk * rows + r;
              worst = Math.max(worst, Math.abs(y[i] - scalar[i]) / m);
            }
          }
          checked++;
        }
      }
    }
  }
  addon.setIsa(initialIsa);
  return { worst, checked };
}

// Q8_0 with 2..7 tokens has its own AVX-512 VNNI kernel (8 rows per tile, rows in lanes):
// row counts around and below its tile (tails repeat the last row), odd block counts, and
// every token count it serves plus its neighbours, against the scalar kernel.
t.test('matmul q8_0, 1..9 tokens over 8-row tiles: every ISA vs scalar', async (t) => {
  const { worst, checked } = q8AgainstScalar(900, [1, 7, 8, 9, 16, 23, 41], [1, 2, 3, 4, 5, 6, 7, 8, 9], (rows, cols, n) => cols === 2048 && n % 3 !== 0 && rows > 9);
  t.ok(worst <= 1e-5, `vs scalar: worst |diff| / sum|terms| = ${worst.toExponential(2)} (${checked} runs)`);
});

// Q8_0 with 32 tokens and more takes pairs of 16-token groups through its own AVX-512 VNNI
// kernel (one lane per token), the rest through the 8-token groups and per-token tiles:
// token counts at and around the pair boundaries, row counts around its 4-row tiles, odd
// block counts, against the scalar kernel.
t.test('matmul q8_0, 31..70 tokens over 16-token groups: every ISA vs scalar', async (t) => {
  const { worst, checked } = q8AgainstScalar(1900, [1, 3, 4, 5, 9, 17], [31, 32, 33, 37, 45, 48, 64, 70], (rows, cols, n) => cols === 2048 && rows > 5 && n !== 37 && n !== 64);
  t.ok(worst <= 1e-5, `vs scalar: worst |diff| / sum|terms| = ${worst.toExponential(2)} (${checked} runs)`);
});

// The AMX Q8_0 kernel (kernels_amx.cc) serves the 16-token groups where the CPU has AMX;
// here its tile instructions are modelled in C++ (kernels_amx_emu.cc), so its tiling (16
// weight rows per A tile, the last rows zero-padded; two 16-token B tiles per pass) and its
// scaling run on any host: against the scalar kernel and a float64 dot product, row counts
// around its 16-row tiles, odd block counts, token counts around the 32-token pairs (the
// tokens after the last pair are not its: they stay NaN). On an AVX-512 VNNI CPU it must
// also give the VNNI kernel's bits, which is what the start-up self-test checks on AMX CPUs.
t.test('matmul q8_0 on AMX tiles (instructions modelled): 16-token groups vs scalar, float64 and VNNI', async (t) => {
  let seed = 4100;
  let worstScalar = 0;
  let worstF64 = 0;
  let checked = 0;
  let vnniChecked = 0;
  let vnniDiffering = 0;
  const vnni = ISAS.includes('avx512') && addon.kernelInfo().vnni;
  for (const rows of [1, 15, 16, 17, 40]) {
    for (const cols of [32, 96, 2048]) {
      for (const n of [31, 32, 40, 64, 70]) {
        if (cols === 2048 && rows > 17 && n !== 64) continue;
        const { bytes, x, wd, xd, scalar } = q8Case(seed, rows, cols, n);
        seed += 2;
        const y = addon.amxMatmulTest(bytes, rows, cols, x, n);
        const grouped = Math.floor(n / 32) * 32;
        let untouched = 0;
        for (let tk = grouped; tk < n; tk++) for (let r = 0; r < rows; r++) if (Number.isNaN(y[tk * rows + r])) untouched++;
        t.equal(untouched, (n - grouped) * rows, `${rows}x${cols}, ${n} tokens: the ${n - grouped} tokens after the pairs are left alone`);
        for (let tk = 0; tk < grouped; tk++) {
          for (let r = 0; r < rows; r++) {
            let s = 0;
            let m = 1e-30;
            for (let k = 0; k < cols; k++) {
              const p = wd[r * cols + k] * xd[tk * cols + k];
              s += p;
              m += Math.abs(p);
            }
            const i = tk * rows + r;
            worstScalar = Math.max(worstScalar, Math.abs(y[i] - scalar[i]) / m);
            worstF64 = Math.max(worstF64, Math.abs(y[i] - s) / m);
          }
        }
        if (grouped > 0) checked++;
        if (vnni && grouped > 0) {
          addon.setIsa('avx512');
          const v = addon.matmulTest('q8_0', bytes, rows, cols, x, n, 2);
          addon.setIsa(initialIsa);
          for (let i = 0; i < grouped * rows; i++) if (!Object.is(v[i], y[i])) vnniDiffering++;
          vnniChecked++;
        }
      }
    }
  }
  t.ok(checked >= 40, `${checked} cases with 16-token groups`);
  t.ok(worstScalar <= 1e-5, `vs scalar: worst |diff| / sum|terms| = ${worstScalar.toExponential(2)}`);
  t.ok(worstF64 <= 1e-5, `vs float64: worst |diff| / sum|terms| = ${worstF64.toExponential(2)}`);
  if (vnni) t.equal(vnniDiffering, 0, `bitwise the AVX-512 VNNI kernel's outputs (${vnniChecked} cases)`);
  else t.comment('no AVX-512 VNNI here: the bitwise comparison with the VNNI kernel is left to the start-up self-test of AMX CPUs');
  // Shapes the kernel refuses as matmulTest does.
  t.throws(() => addon.amxMatmulTest(new Uint8Array(34), 1, 33, new Float32Array(33 * 32), 32), /cols|32/);
  t.throws(() => addon.amxMatmulTest(new Uint8Array(10), 1, 32, new Float32Array(32 * 32), 32), /weights/);
});

// The scalar kernel, and the AVX2 per-token tiles (one-token decode tiles, two blocks per
// iteration, and the tiles of up to 5 tokens; odd block counts: 96 and 160 columns, one
// block: 32), compute every (row, token) output with the same arithmetic: a
// token's outputs are bit-identical alone and inside such a batch. (The token groups of
// 6 tokens and more, AVX2 and AVX-512 VNNI, put tokens in lanes and add in another order;
// they are held to the bound against scalar above.)
t.test('matmul q8_0 / q4_0, scalar and avx2 per-token tiles: a token alone and inside batches gives bit-identical outputs', async (t) => {
  let seed = 3100;
  for (const isa of ISAS.filter((i) => i === 'scalar' || i === 'avx2')) {
    addon.setIsa(isa);
    for (const type of ['q8_0', 'q4_0'] as const) {
      for (const [rows, cols] of [
        [37, 2048],
        [5, 8192],
        [9, 96],
        [6, 32],
        [3, 160],
      ]) {
        const w = randomMatrix(seed++, rows * cols, 0.05);
        const bytes = addon.quantizeRows(type, w, rows, cols);
        for (const n of isa === 'scalar' ? [2, 3, 4, 5, 9, 17, 40] : [2, 3, 4, 5]) {
          const x = randomMatrix(seed++, n * cols, 1);
          const batch = addon.matmulTest(type, bytes, rows, cols, x, n, 2);
          let differing = 0;
          for (let tk = 0; tk < n; tk++) {
            const alone = addon.matmulTest(type, bytes, rows, cols, x.subarray(tk * cols, (tk + 1) * cols), 1, 2);
            for (let r = 0; r < rows; r++) if (!Object.is(alone[r], batch[tk * rows + r])) differing++;
          }
          t.equal(differing, 0, `${isa} ${type} ${rows}x${cols}, ${n} tokens: outputs equal to each token's own`);
        }
      }
    }
  }
  addon.setIsa(initialIsa);
});

t.test('matmul: threads 1 and 2 give identical results, and n = 0 / ldy handling', async (t) => {
  const rows = 1001;
  const cols = 512;
  const n = 6;
  const w = randomMatrix(42, rows * cols, 0.05);
  const x = randomMatrix(43, n * cols);
  for (const type of TYPES) {
    const bytes = addon.quantizeRows(type, w, rows, cols);
    const y1 = addon.matmulTest(type, bytes, rows, cols, x, n, 1);
    const y2 = addon.matmulTest(type, bytes, rows, cols, x, n, 2);
    t.equal(Buffer.compare(Buffer.from(y1.buffer), Buffer.from(y2.buffer)), 0, `${type}: bit-identical`);
  }
  t.equal(addon.matmulTest('q8_0', addon.quantizeRows('q8_0', w, 4, 32), 4, 32, x, 0, 2).length, 0);
  t.throws(() => addon.matmulTest('q8_0', new Uint8Array(10), 4, 32, x, 1, 1), /bytes/);
  t.throws(() => addon.quantizeRows('q4_0', w, 1, 33), /multiple of 32/);
});

// The AVX2 decode tile moves the sign of x onto the weights (kernels.h: Q8_0), exact only
// for weights in [-127, 127]: the quantizer never writes -128, and matmulTest refuses it.
t.test('q8_0 weights: the quantizer writes none of -128, and matmulTest refuses it', async (t) => {
  const rows = 64;
  const cols = 256;
  const w = randomMatrix(77, rows * cols, 0.05);
  // Blocks whose extreme is negative, positive, and blocks of one repeated value.
  for (let b = 0; b < (rows * cols) / 32; b += 3) w[b * 32 + (b % 32)] = b % 2 ? -1 : 1;
  for (let j = 0; j < 32; j++) w[j] = -0.25;
  const bytes = addon.quantizeRows('q8_0', w, rows, cols);
  let minQ = 0;
  let maxQ = 0;
  for (let b = 0; b < bytes.length / 34; b++) {
    for (let j = 0; j < 32; j++) {
      const q = (bytes[b * 34 + 2 + j] << 24) >> 24;
      minQ = Math.min(minQ, q);
      maxQ = Math.max(maxQ, q);
    }
  }
  t.equal(minQ, -127, 'the most negative weight of a block is -127');
  t.equal(maxQ, 127, 'the most positive is 127');
  const x = randomMatrix(78, cols, 1);
  t.equal(addon.matmulTest('q8_0', bytes, rows, cols, x, 1, 2).length, rows, 'the quantizer\'s bytes are accepted');
  const bad = Uint8Array.from(bytes);
  bad[5 * 34 + 2 + 7] = 0x80;
  t.throws(() => addon.matmulTest('q8_0', bad, rows, cols, x, 1, 2), /\[-127, 127\]: block 5 holds -128/);
});

t.test('thread pool: an exception in a worker reaches the caller', async (t) => {
  for (let i = 0; i < 3; i++) {
    t.throws(() => addon.poolThrowTest(2, 4000), /worker 1 failed on item \d+/);
  }
});
