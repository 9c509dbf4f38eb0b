// The engine's vector primitives beside the matrix kernels: attention over the paged KV
// cache (online softmax over tiles of a block, keys stored transposed), SwiGLU, and
// activations gathered by token (each token's input quantized once for all its experts).
// Every ISA this CPU runs is held against a float64 reference written here.
import t from 'tap';
import { loadNative, type KernelIsa, type WeightType } from '../src/engine/native.js';
import { Rng } from '../src/model/prng.js';

const addon = loadNative();
const initialIsa = addon.kernelInfo().active;
t.teardown(() => {
  addon.setIsa(initialIsa);
});
const ISAS = (['scalar', 'avx2', 'avx512'] as KernelIsa[]).filter((isa) => {
  const ok = addon.setIsa(isa);
  addon.setIsa(initialIsa);
  return ok;
});

interface AttnCase {
  nq: number;
  hd: number;
  bs: number;
  kvh: number;
  g: number;
  visible: number;
  /** Multiplies the queries: large values make the softmax peaked (scores in the hundreds). */
  qScale?: number;
}

/** A paged cache of `blocks` blocks in the engine's layout, NaN everywhere nothing was written. */
function makeCache(c: AttnCase, seed: number) {
  const nBlocks = Math.ceil(c.visible / c.bs);
  const spare = 3;
  const total = nBlocks + spare;
  // Non-contiguous, out-of-order block ids; the spare blocks stay NaN (never read).
  const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));
  const step = [5, 7, 11, 13].find((m) => gcd(m, total) === 1)!;
  const blocks = Int32Array.from({ length: nBlocks }, (_, i) => (i * step + 2) % total);
  const elems = total * c.kvh * c.hd * c.bs;
  const keys = new Float32Array(elems).fill(NaN);
  const values = new Float32Array(elems).fill(NaN);
  const rng = new Rng(seed);
  const k = new Float32Array(c.visible * c.kvh * c.hd);
  const v = new Float32Array(c.visible * c.kvh * c.hd);
  rng.fillNormal(k, 0, 1);
  rng.fillNormal(v, 0, 1);
  // Position-major copies (p, head, d) for the reference; the cache gets every head.
  for (let p = 0; p < c.visible; p++) {
    const b = blocks[Math.floor(p / c.bs)];
    const i = p % c.bs;
    for (let g = 0; g < c.kvh; g++) {
      for (let d = 0; d < c.hd; d++) {
        const src = (p * c.kvh + g) * c.hd + d;
        keys[((b * c.kvh + g) * c.hd + d) * c.bs + i] = k[src];
        values[((b * c.kvh + g) * c.bs + i) * c.hd + d] = v[src];
      }
    }
  }
  const q = new Float32Array(c.nq * c.hd);
  rng.fillNormal(q, 0, c.qScale ?? 1);
  return { blocks, keys, values, q, k, v };
}

/** float32 -> IEEE float16 bits (the engine's conversion; NaN stays NaN). */
function toF16(x: Float32Array): Uint16Array {
  const b = addon.quantizeRows('f16', x, 1, x.length);
  return new Uint16Array(b.buffer, b.byteOffset, x.length);
}
/** x rounded through float16. */
function roundF16(x: Float32Array): Float32Array {
  const h = toF16(x);
  return addon.dequantizeRow('f16', new Uint8Array(h.buffer, h.byteOffset, h.byteLength), x.length);
}

/** Two-pass softmax attention in float64. */
function reference(c: AttnCase, q: Float32Array, k: Float32Array, v: Float32Array, scale: number): Float64Array {
  const out = new Float64Array(c.nq * c.hd);
  const s = new Float64Array(c.visible);
  for (let h = 0; h < c.nq; h++) {
    let mx = -Infinity;
    for (let p = 0; p < c.visible; p++) {
      let acc = 0;
      for (let d = 0; d < c.hd; d++) acc += q[h * c.hd + d] * k[(p * c.kvh + c.g) * c.hd + d];
      s[p] = acc * scale;
      mx = Math.max(mx, s[p]);
    }
    let sum = 0;
    for (let p = 0; p < c.visible; p++) sum += s[p] = Math.exp(s[p] - mx);
    for (let p = 0; p < c.visible; p++) {
      for (let d = 0; d < c.hd; d++) out[h * c.hd + d] += (s[p] / sum) * v[(p * c.kvh + c.g) * c.hd + d];
    }
  }
  return out;
}

const ATTN_CASES: AttnCase[] = [
  { nq: 8, hd: 128, bs: 16, kvh: 4, g: 3, visible: 1 }, // decode, first token
  { nq: 8, hd: 128, bs: 16, kvh: 4, g: 0, visible: 16 }, // exactly one block
  { nq: 8, hd: 128, bs: 16, kvh: 4, g: 1, visible: 17 }, // one position into the next block
  { nq: 8, hd: 128, bs: 16, kvh: 4, g: 2, visible: 300, qScale: 6 }, // long, peaked
  { nq: 4, hd: 64, bs: 32, kvh: 2, g: 1, visible: 100 }, // blocks of two tiles
  { nq: 1, hd: 24, bs: 5, kvh: 3, g: 2, visible: 23 }, // odd block size, head_dim not a multiple of 16
  { nq: 10, hd: 40, bs: 1, kvh: 1, g: 0, visible: 9 }, // more heads than one tile, one position a block
  { nq: 7, hd: 8, bs: 7, kvh: 2, g: 1, visible: 50, qScale: 30 }, // scores in the hundreds
  { nq: 3, hd: 20, bs: 16, kvh: 1, g: 0, visible: 40 }, // head_dim not a multiple of 8
  { nq: 16, hd: 136, bs: 16, kvh: 1, g: 0, visible: 33 }, // two tiles of heads, head_dim 8 x 17
];

/**
 * attend() of every ISA against `want`: every output finite (the unwritten positions are
 * NaN, so reading one shows) and within 2e-5 of the largest output (float32 scores and
 * sums over up to 300 positions).
 */
function checkIsas(t: { ok(ok: boolean, message: string): unknown }, label: string, want: Float64Array, run: () => Float32Array): void {
  let peak = 0;
  for (const x of want) peak = Math.max(peak, Math.abs(x));
  for (const isa of ISAS) {
    addon.setIsa(isa);
    const got = run();
    let worst = 0;
    let finite = true;
    for (let i = 0; i < want.length; i++) {
      if (!Number.isFinite(got[i])) finite = false;
      worst = Math.max(worst, Math.abs(got[i] - want[i]));
    }
    t.ok(finite, `${isa} ${label}: every output finite (no unwritten position read)`);
    t.ok(worst <= 2e-5 * peak, `${isa} ${label}: max error ${worst.toExponential(2)} <= 2e-5 x ${peak.toFixed(3)}`);
  }
  addon.setIsa(initialIsa);
}

const describe = (c: AttnCase, ci: number) => `case ${ci} (nq ${c.nq}, hd ${c.hd}, bs ${c.bs}, visible ${c.visible})`;

t.test('attend: every ISA against a float64 two-pass softmax, NaN wherever nothing was written', async (t) => {
  t.ok(ISAS.includes('scalar'));
  for (const [ci, c] of ATTN_CASES.entries()) {
    const { blocks, keys, values, q, k, v } = makeCache(c, 100 + ci);
    const scale = 1 / Math.sqrt(c.hd);
    checkIsas(t, describe(c, ci), reference(c, q, k, v, scale), () => addon.attendTest(q, keys, values, blocks, c.nq, c.hd, c.bs, c.kvh, c.g, c.visible, scale));
  }
});

t.test('attend over a float16 cache: every ISA against float64 on the float16-rounded keys and values', async (t) => {
  const nans = (x: ArrayLike<number>) => Array.prototype.filter.call(x, Number.isNaN).length;
  for (const [ci, c] of ATTN_CASES.entries()) {
    const { blocks, keys, values, q, k, v } = makeCache(c, 300 + ci);
    const scale = 1 / Math.sqrt(c.hd);
    const k16 = toF16(keys);
    const v16 = toF16(values);
    const k16back = addon.dequantizeRow('f16', new Uint8Array(k16.buffer, k16.byteOffset, k16.byteLength), keys.length);
    t.ok(nans(keys) > 0 && nans(k16back) === nans(keys), `case ${ci}: the ${nans(keys)} unwritten key slots stay NaN in float16`);
    checkIsas(t, `f16 ${describe(c, ci)}`, reference(c, q, roundF16(k), roundF16(v), scale), () =>
      addon.attendTest(q, k16, v16, blocks, c.nq, c.hd, c.bs, c.kvh, c.g, c.visible, scale),
    );
  }
  const c = ATTN_CASES[1];
  const { blocks, keys, values, q } = makeCache(c, 5);
  t.throws(() => addon.attendTest(q, toF16(keys), values, blocks, c.nq, c.hd, c.bs, c.kvh, c.g, c.visible, 0.1), /same array type/);
});

t.test('attendTest checks its bounds', async (t) => {
  const c: AttnCase = { nq: 2, hd: 16, bs: 4, kvh: 1, g: 0, visible: 6 };
  const { blocks, keys, values, q } = makeCache(c, 7);
  t.throws(() => addon.attendTest(q, keys, values, Int32Array.of(0, 99), 2, 16, 4, 1, 0, 6, 0.25), /block 99 outside/);
  t.throws(() => addon.attendTest(q, keys, values, Int32Array.of(0), 2, 16, 4, 1, 0, 6, 0.25), /blocks has 1 elements, needs 2/);
  t.throws(() => addon.attendTest(q.subarray(0, 10), keys, values, blocks, 2, 16, 4, 1, 0, 6, 0.25), /q has 10 elements/);
  t.throws(() => addon.attendTest(q, keys, values, blocks, 2, 16, 4, 1, 1, 6, 0.25), /g must be an integer in \[0, 0\]/);
});

t.test('siluMul: every ISA against float64, tails of every length and extreme inputs', async (t) => {
  const rng = new Rng(3);
  for (const n of [1, 7, 8, 9, 15, 16, 17, 33, 100]) {
    const gate = rng.fillNormal(new Float32Array(n), 0, 4);
    const up = rng.fillNormal(new Float32Array(n), 0, 1);
    const extremes = [0, -0, 1e-3, -1e-3, 20, -20, 88, -88, 100, -100, 1e4, -1e4];
    for (let i = 0; i < Math.min(n, extremes.length); i++) gate[i] = extremes[i];
    for (const isa of ISAS) {
      addon.setIsa(isa);
      const got = addon.siluMulTest(gate, up);
      let bad = 0;
      for (let i = 0; i < n; i++) {
        const g = gate[i];
        const want = (g / (1 + Math.exp(-g))) * up[i];
        if (!(Math.abs(got[i] - want) <= 1e-6 * Math.abs(want) + 1e-30)) bad++;
      }
      t.equal(bad, 0, `${isa} n=${n}: silu(gate) * up within 1e-6 relative`);
    }
  }
  addon.setIsa(initialIsa);
});

t.test('gathered activations are byte for byte those prepared from the rows themselves', async (t) => {
  const n = 40;
  const cols = 64;
  const x = new Rng(11).fillNormal(new Float32Array(n * cols), 0, 1);
  const rowSets = [[], [3], [0, 5, 9, 2, 39], [1, 2, 3, 4, 5, 6, 7, 8], Array.from({ length: 32 }, (_, i) => 39 - i), Array.from({ length: 37 }, (_, i) => (i * 7) % n)];
  for (const type of ['q8_0', 'q4_0', 'f32', 'f16', 'bf16'] as WeightType[]) {
    for (const isa of ISAS) {
      addon.setIsa(isa);
      for (const rows of rowSets) {
        const [gathered, direct] = addon.gatherActsTest(type, x, n, cols, Int32Array.from(rows));
        t.ok(Buffer.compare(Buffer.from(gathered), Buffer.from(direct)) === 0 && gathered.length === direct.length, `${isa} ${type}, ${rows.length} rows: ${gathered.length} equal bytes`);
      }
    }
  }
  addon.setIsa(initialIsa);
  t.throws(() => addon.gatherActsTest('q8_0', x, n, cols, Int32Array.of(1, 40)), /row 40 outside the 40 prepared/);
  t.throws(() => addon.gatherActsTest('q8_0', x, n, cols, Int32Array.of(-1)), /row -1 outside/);
});
