// Invariants of the reference forward pass that hold for any weights. They check the
// oracle itself: each fails if a piece of the model (causal mask, cache, routing,
// expert combination) is wrong.

import t from 'tap';
import { moeBlock, route, swiglu, softmax, type LayerWeights, type ReferenceModel } from '../src/model/reference.js';
import { Rng } from '../src/model/prng.js';
import { ARCHITECTURES } from '../src/model/spec.js';
import { memoryModel, relMaxError, tinySpec } from './helpers/models.js';

function randomTokens(n: number, vocab: number, seed: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => rng.u32() % vocab);
}

function rows(a: Float32Array, from: number, to: number, width: number): Float32Array {
  return a.subarray(from * width, to * width);
}

for (const arch of ARCHITECTURES) {
  t.test(arch, async (t) => {
    const spec = tinySpec(arch);
    const model = memoryModel(spec, 7);
    const V = spec.vocabSize;
    const seq = randomTokens(12, V, 3);

    t.test('logits of position p do not change when later tokens are appended', async (t) => {
      const short = model.forward(seq.slice(0, 7), model.newCache());
      const long = model.forward(seq, model.newCache());
      t.ok(relMaxError(short, rows(long, 0, 7, V)) < 1e-6);
      // Negative control: the appended positions do differ from each other.
      t.ok(relMaxError(rows(long, 7, 8, V), rows(long, 8, 9, V)) > 1e-3);
    });

    t.test('decoding with the KV cache equals recomputing the whole sequence', async (t) => {
      const full = model.forward(seq, model.newCache());
      const cache = model.newCache();
      const parts = [model.forward(seq.slice(0, 5), cache)];
      for (let i = 5; i < seq.length; i++) parts.push(model.forward([seq[i]], cache));
      t.equal(cache.length, seq.length);
      const joined = new Float32Array(full.length);
      let off = 0;
      for (const p of parts) {
        joined.set(p, off);
        off += p.length;
      }
      const err = relMaxError(full, joined);
      t.comment(`max relative error ${err.toExponential(2)}`);
      t.ok(err < 1e-5);
    });

    t.test('permuting the experts with the router rows leaves the logits unchanged', async (t) => {
      const base = model.forward(seq, model.newCache());
      const perm = permutedModel(model, 11);
      const permuted = perm.forward(seq, perm.newCache());
      const err = relMaxError(base, permuted);
      t.comment(`max relative error ${err.toExponential(2)}`);
      t.ok(err < 1e-5);
      // Negative control: permuting the experts alone (router rows kept) changes the logits.
      const broken = permutedModel(model, 11, false);
      t.ok(relMaxError(base, broken.forward(seq, broken.newCache())) > 1e-3);
    });

    t.test('with all experts identical the MoE block is the dense FFN', async (t) => {
      const lw = model.w.layers[0];
      const same: LayerWeights = { ...lw, experts: lw.experts.map(() => lw.experts[0]) };
      const h = spec.hiddenSize;
      const x = new Rng(5).fillNormal(new Float32Array(4 * h), 0, 1);
      const moe = moeBlock(spec, same, x, 4);
      for (let tok = 0; tok < 4; tok++) {
        const dense = swiglu(lw.experts[0], h, spec.expertIntermediateSize, x, tok * h);
        // Without renormalisation the kept probability mass scales the expert's output.
        const mass = moe.routing[tok].weights.reduce((a, b) => a + b, 0);
        if (spec.gating === 'softmax_topk_renorm') t.ok(Math.abs(mass - 1) < 1e-12);
        else t.ok(mass < 1);
        const expect = new Float32Array(h);
        for (let i = 0; i < h; i++) expect[i] = mass * dense[i];
        if (lw.shared) {
          const sh = swiglu(lw.shared, h, spec.sharedExpertIntermediateSize, x, tok * h);
          let g = 0;
          for (let i = 0; i < h; i++) g += lw.shared.gateScalar[i] * x[tok * h + i];
          for (let i = 0; i < h; i++) expect[i] += sh[i] / (1 + Math.exp(-g));
        }
        t.ok(relMaxError(expect, moe.out.subarray(tok * h, (tok + 1) * h)) < 1e-5, `token ${tok}`);
      }
    });
  });
}

t.test('gating rules', async (t) => {
  const logits = [0.3, -1.2, 2.5, 0.9, 2.4, -0.1, 1.7, 0.0];
  const mixtral = tinySpec('mixtral');
  const r = route(mixtral, logits);
  t.same(r.experts, [2, 4]);
  // Mixtral: a softmax over the top-k logits.
  const sm = softmax([2.5, 2.4]);
  t.ok(Math.abs(r.weights[0] - sm[0]) < 1e-12 && Math.abs(r.weights[1] - sm[1]) < 1e-12);
  // Qwen2-MoE: the full softmax's probabilities, not renormalised.
  const qwen2 = { ...tinySpec('qwen2_moe'), numExperts: 8, topK: 3 };
  const full = softmax(logits);
  const q = route(qwen2, logits);
  t.same(q.experts, [2, 4, 6]);
  t.ok(q.weights.every((w, i) => Math.abs(w - full[q.experts[i]]) < 1e-12));
  // Ties go to the lower expert id.
  t.same(route({ ...qwen2, topK: 2 }, [1, 3, 3, 0, 0, 0, 0, 0]).experts, [1, 2]);
});

/** A copy of the model whose experts in every layer are permuted (and router rows too, unless told not to). */
function permutedModel(model: ReferenceModel, seed: number, moveRouter = true): ReferenceModel {
  const s = model.spec;
  const rng = new Rng(seed);
  const layers = model.w.layers.map((lw) => {
    const perm = Array.from({ length: s.numExperts }, (_, i) => i);
    for (let i = perm.length - 1; i > 0; i--) {
      const j = rng.u32() % (i + 1);
      [perm[i], perm[j]] = [perm[j], perm[i]];
    }
    const router = new Float32Array(lw.router.length);
    const h = s.hiddenSize;
    // New expert slot i holds old expert perm[i]; its router row moves with it.
    perm.forEach((old, i) => router.set(lw.router.subarray(old * h, (old + 1) * h), i * h));
    return { ...lw, router: moveRouter ? router : lw.router, experts: perm.map((old) => lw.experts[old]) };
  });
  return new (model.constructor as new (...a: unknown[]) => ReferenceModel)(s, { ...model.w, layers });
}

t.test('generated weights keep activations in a sane range through every layer', async (t) => {
  const rms = (a: Float32Array) => Math.sqrt(a.reduce((acc, v) => acc + v * v, 0) / a.length);
  for (const arch of ARCHITECTURES) {
    const spec = tinySpec(arch, { numLayers: 8 });
    const model = memoryModel(spec, 1);
    const perLayer: number[] = [];
    const logits = model.forward(randomTokens(16, spec.vocabSize, 2), model.newCache(), {
      onResidual: (_l, x) => perLayer.push(rms(x)),
    });
    t.ok(logits.every(Number.isFinite), `${arch}: finite logits`);
    t.comment(`${arch}: residual rms by layer ${perLayer.map((r) => r.toFixed(2)).join(' ')}; logit rms ${rms(logits).toFixed(2)}`);
    // Embeddings have rms 1; each of 16 sublayers adds O(1), so the stream stays within a few units.
    t.ok(perLayer.every((r) => r > 0.5 && r < 8), `${arch}: residual rms within (0.5, 8)`);
    t.ok(rms(logits) > 1 && rms(logits) < 20, `${arch}: logit rms within (1, 20)`);
  }
});
