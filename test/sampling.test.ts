// Token sampling (src/engine/sampling.ts): against a plain oracle of the documented rule
// (every candidate ranked by a full sort), over random logits with ties, flat and peaked
// distributions and every truncation; and the untruncated draw's frequencies against the
// softmax.
import t from 'tap';
import { loadNative } from '../src/engine/native.js';
import { sample, samplingWeights, type SamplingParams } from '../src/engine/sampling.js';
import { Rng } from '../src/model/prng.js';

/** The rule in sample()'s documentation, written plainly: rank everything, cut, draw. */
function oracle(logits: Float32Array, p: SamplingParams, rng: Rng): number {
  const n = logits.length;
  let best = 0;
  for (let i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
  if (p.temperature <= 0) return best;
  // The weights as sample() computes them (their accuracy is checked below).
  const w = new Float64Array(n);
  const sum = samplingWeights(logits, 0, n, p.temperature, w);
  const topK = p.topK > 0 && p.topK < n ? p.topK : n;
  if (topK === n && p.topP >= 1 && !(p.minP > 0)) {
    let r = rng.uniform() * sum;
    for (let i = 0; i < n; i++) {
      r -= w[i];
      if (r < 0) return i;
    }
    let last = n - 1;
    while (last > 0 && w[last] === 0) last--;
    return last;
  }
  const ranked = Array.from({ length: n }, (_, i) => i).sort((a, b) => w[b] - w[a] || a - b);
  let keep = topK;
  if (p.minP > 0) {
    const floor = p.minP * (w[ranked[0]] / sum);
    let k = 0;
    while (k < keep && w[ranked[k]] / sum >= floor) k++;
    keep = Math.max(1, k);
  }
  if (p.topP < 1) {
    let acc = 0;
    let k = 0;
    while (k < keep) {
      acc += w[ranked[k]] / sum;
      k++;
      if (acc >= p.topP) break;
    }
    keep = Math.max(1, k);
  }
  let total = 0;
  for (let k = 0; k < keep; k++) total += w[ranked[k]] / sum;
  let r = rng.uniform() * total;
  for (let k = 0; k < keep; k++) {
    r -= w[ranked[k]] / sum;
    if (r < 0) return ranked[k];
  }
  return ranked[keep - 1];
}

function logitsOf(kind: string, n: number, rng: Rng): Float32Array {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    if (kind === 'flat') x[i] = rng.normal() * 0.1;
    else if (kind === 'peaked') x[i] = rng.normal() * 6;
    else x[i] = Math.floor(rng.uniform() * 4); // many exact ties
  }
  return x;
}

t.test('sample() draws what the plain rule draws, for every truncation, with ties, flat and peaked logits', async (t) => {
  const gen = new Rng(1);
  let cases = 0;
  let mismatches = 0;
  for (const n of [1, 5, 63, 64, 65, 300, 5000]) {
    for (const kind of ['flat', 'peaked', 'ties']) {
      const logits = logitsOf(kind, n, gen);
      for (const temperature of [0, 0.5, 1, 2.5]) {
        for (const topK of [0, 1, 3, 50, 64, 100, n + 5]) {
          for (const topP of [1, 0.9, 0.5, 0.01]) {
            for (const minP of [0, 0.05, 0.5]) {
              const p = { temperature, topK, topP, minP };
              const seed = 1000 + cases;
              const a = new Rng(seed);
              const b = new Rng(seed);
              for (let d = 0; d < 3; d++) {
                cases++;
                if (sample(logits, p, a) !== oracle(logits, p, b)) mismatches++;
              }
            }
          }
        }
      }
    }
  }
  t.equal(mismatches, 0, `${cases} draws: the same token as the plain rule`);
});

t.test('a temperature too small for float32 still samples (the largest logit)', async (t) => {
  const logits = Float32Array.from([0.5, 3, -1, 2.999]);
  for (const temperature of [1e-40, 1e-31]) {
    t.equal(sample(logits, { temperature, topK: 0, topP: 1, minP: 0 }, new Rng(1)), 1, `T = ${temperature}`);
    t.equal(sample(logits, { temperature, topK: 2, topP: 0.9, minP: 0 }, new Rng(1)), 1, `T = ${temperature}, truncated`);
  }
});

t.test('sample() reads the window [off, off + n) only', async (t) => {
  const logits = Float32Array.from([100, 0, 1, 2, 3, 100]);
  const inner = logits.subarray(1, 5);
  for (const p of [{ temperature: 1, topK: 0, topP: 1, minP: 0 }, { temperature: 1, topK: 2, topP: 0.9, minP: 0 }]) {
    for (let s = 0; s < 20; s++) {
      const id = sample(logits, p, new Rng(s), 1, 4);
      t.equal(id, oracle(inner, p, new Rng(s)), `seed ${s}, topK ${p.topK}: id ${id} of the window`);
    }
  }
});

t.test('sampling weights: every ISA within float32 rounding of float64 e^x, exact zeros for -inf logits, the sum over the window', async (t) => {
  const addon = loadNative();
  const initial = addon.kernelInfo().active;
  const gen = new Rng(4);
  for (const isa of ['scalar', 'avx2', 'avx512'] as const) {
    if (!addon.setIsa(isa)) continue;
    for (const n of [1, 7, 8, 15, 16, 17, 1000, 151936]) {
      for (const temperature of [0.05, 0.7, 1, 3]) {
        const logits = new Float32Array(n + 3).map(() => gen.normal() * 4);
        if (n > 2) logits[2] = -Infinity;
        const out = new Float64Array(n);
        const sum = addon.expWeights(logits, 1, n, temperature, out);
        let max = -Infinity;
        for (let i = 1; i <= n; i++) max = Math.max(max, logits[i]);
        let bad = 0;
        let want = 0;
        for (let i = 0; i < n; i++) {
          const arg = (logits[1 + i] - max) / temperature;
          const e = Math.exp(arg);
          want += out[i];
          // float32: the argument carries about 2e-7 x |arg| of rounding (x - max, then
          // times 1 / temperature), the exponential about 2 ulp; what underflows may be 0.
          if (e === 0 ? out[i] !== 0 : !(Math.abs(out[i] - e) <= (3e-7 + 2e-7 * Math.abs(arg)) * e + 1e-37)) bad++;
        }
        if (n > 2 && out[1] !== 0) bad++;
        t.equal(bad, 0, `${isa} n=${n} T=${temperature}: weights within float32 rounding${n > 2 ? ', the -inf logit 0' : ''}`);
        t.ok(Math.abs(sum - want) <= 1e-12 * want, `${isa} n=${n} T=${temperature}: the sum of the weights`);
      }
    }
  }
  addon.setIsa(initial);
  t.throws(() => addon.expWeights(new Float32Array(4), 2, 3, 1, new Float64Array(3)), /logits has 4 elements, needs 5/);
  t.throws(() => addon.expWeights(new Float32Array(4), 0, 4, 0, new Float64Array(4)), /temperature must be a finite number >= 1e-30/);
  t.throws(() => addon.expWeights(new Float32Array(4), 0, 4, 1e-39, new Float64Array(4)), /temperature must be a finite number >= 1e-30/);
  t.throws(() => addon.expWeights(new Float32Array(4), 0, 4, 1, new Float64Array(2)), /out has 2 elements/);
});

t.test('the untruncated draw follows the softmax', async (t) => {
  const logits = Float32Array.from([0, 1, 2, -1, 0.5, 3]);
  const temperature = 0.8;
  const w = Array.from(logits, (v) => Math.exp(v / temperature));
  const z = w.reduce((a, b) => a + b, 0);
  const draws = 60000;
  const counts = new Array(logits.length).fill(0);
  const rng = new Rng(7);
  for (let d = 0; d < draws; d++) counts[sample(logits, { temperature, topK: 0, topP: 1, minP: 0 }, rng)]++;
  for (let i = 0; i < logits.length; i++) {
    const want = w[i] / z;
    const sd = Math.sqrt((want * (1 - want)) / draws);
    t.ok(Math.abs(counts[i] / draws - want) < 5 * sd, `token ${i}: ${(counts[i] / draws).toFixed(4)} vs ${want.toFixed(4)} (5 sd = ${(5 * sd).toFixed(4)})`);
  }
});
