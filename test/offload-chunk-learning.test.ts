// Routing learned from a prompt chunk (several tokens of one sequence in one layer
// visit, as the offload runner sees prefill) must equal what the same tokens teach when
// they come one per visit: transitions link each token to the one before it at the same
// layer, cross-layer counts pair a token with itself at the layer below, and the
// nearest-neighbour window holds each token's own routing.

import t, { type Test } from 'tap';
import { ForecastPolicy } from '../src/offload/forecast.js';
import { RoutingPredictor } from '../src/router/predictor.js';
import { Rng } from '../src/model/prng.js';

const L = 4;
const E = 16;
const K = 3;

/** Tokens with routing that depends on the token before and on the layer below (learnable structure). */
function routedTokens(n: number, seed: number): number[][][] {
  const rng = new Rng(seed);
  const out: number[][][] = [];
  let prev: number[][] | null = null;
  for (let t = 0; t < n; t++) {
    const tok: number[][] = [];
    for (let l = 0; l < L; l++) {
      const set = new Set<number>();
      if (prev && rng.uniform() < 0.6) set.add(prev[l][0]);
      if (l > 0 && rng.uniform() < 0.6) set.add((tok[l - 1][1] + 5) % E);
      while (set.size < K) set.add(Math.floor(rng.uniform() * E));
      tok.push([...set]);
    }
    out.push(tok);
    prev = tok;
  }
  return out;
}

const close = (t: Test, a: ArrayLike<number>, b: ArrayLike<number>, what: string) => {
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  t.ok(worst < 1e-12, `${what}: max difference ${worst}`);
};

t.test('RoutingPredictor: a prompt chunk teaches what its tokens one by one teach', async (t) => {
  const tokens = routedTokens(40, 7);
  const prompt = tokens.slice(0, 30);
  const chunked = new RoutingPredictor({ layers: L, experts: E });
  const single = new RoutingPredictor({ layers: L, experts: E });
  for (let l = 0; l < L; l++) chunked.observe(l, prompt.map((tok) => ({ seq: 1, experts: tok[l] })));
  for (const tok of prompt) for (let l = 0; l < L; l++) single.observe(l, [{ seq: 1, experts: tok[l] }]);
  // Then the same decode tokens one at a time for both.
  for (const tok of tokens.slice(30)) {
    for (let l = 0; l < L; l++) {
      chunked.observe(l, [{ seq: 1, experts: tok[l] }]);
      single.observe(l, [{ seq: 1, experts: tok[l] }]);
      const a = new Float64Array(E);
      const b = new Float64Array(E);
      close(t, chunked.nextToken(1, l, a), single.nextToken(1, l, b), `next token, layer ${l}`);
      if (l + 1 < L) close(t, chunked.nextLayer(1, l + 1, a), single.nextLayer(1, l + 1, b), `next layer ${l + 1}`);
    }
  }
  // The cross-layer estimate is not trivially zero: the routing has cross-layer structure.
  const p = single.nextLayer(1, 2, new Float64Array(E));
  t.ok(Math.max(...p) > 0.3, `cross-layer forecast learned (max ${Math.max(...p).toFixed(3)})`);
});

t.test('ForecastPolicy: a prompt chunk teaches what its tokens one by one teach', async (t) => {
  const tokens = routedTokens(48, 11);
  const prompt = tokens.slice(0, 36);
  const shape = { layers: L, experts: E, capacity: 6 };
  const chunked = new ForecastPolicy(shape, { prefetch: false });
  const single = new ForecastPolicy(shape, { prefetch: false });
  chunked.useExplicitEnds();
  single.useExplicitEnds();
  const union = (toks: number[][][], l: number) => [...new Set(toks.flatMap((tok) => tok[l]))];
  for (let l = 0; l < L; l++) {
    chunked.observeRouting(l, prompt.map((tok) => ({ seq: 3, experts: tok[l] })));
    chunked.request(l, union(prompt, l));
  }
  for (const tok of prompt) {
    for (let l = 0; l < L; l++) {
      single.observeRouting(l, [{ seq: 3, experts: tok[l] }]);
      single.request(l, tok[l]);
    }
  }
  let compared = 0;
  for (const tok of tokens.slice(36)) {
    for (let l = 0; l < L; l++) {
      for (const p of [chunked, single]) {
        p.observeRouting(l, [{ seq: 3, experts: tok[l] }]);
        p.request(l, tok[l]);
      }
      const a = chunked.routingForecast(l);
      const b = single.routingForecast(l);
      for (const k of ['nextToken', 'twoBack', 'crossLayer', 'neighbours', 'neighboursAhead'] as const) {
        close(t, a[k], b[k], `${k}, layer ${l}`);
        compared++;
      }
    }
  }
  t.equal(compared, 12 * L * 5);
  const f = single.routingForecast(2);
  t.ok(Math.max(...f.crossLayer) > 0.2 && Math.max(...f.neighbours) > 0, 'the forecasts are learned, not all zero');
});

t.test('ForecastPolicy: prompt chunks longer than the window, several at once, keep the counts exact', async (t) => {
  const seqs = [0, 1, 2, 3, 4].map((s) => routedTokens(420, 100 + s));
  const shape = { layers: L, experts: E, capacity: 6 };
  const chunked = new ForecastPolicy(shape, { prefetch: false });
  const single = new ForecastPolicy(shape, { prefetch: false });
  chunked.useExplicitEnds();
  single.useExplicitEnds();
  const P = 400;
  for (let l = 0; l < L; l++) {
    chunked.observeRouting(l, seqs.flatMap((toks, s) => toks.slice(0, P).map((tok) => ({ seq: s, experts: tok[l] }))));
    chunked.request(l, [...new Set(seqs.flatMap((toks) => toks.slice(0, P).flatMap((tok) => tok[l])))]);
  }
  for (let i = 0; i < P; i++) {
    for (let l = 0; l < L; l++) {
      single.observeRouting(l, seqs.map((toks, s) => ({ seq: s, experts: toks[i][l] })));
      single.request(l, [...new Set(seqs.flatMap((toks) => toks[i][l]))]);
    }
  }
  for (let i = P; i < 420; i++) {
    for (let l = 0; l < L; l++) {
      for (const p of [chunked, single]) {
        p.observeRouting(l, seqs.map((toks, s) => ({ seq: s, experts: toks[i][l] })));
        p.request(l, [...new Set(seqs.flatMap((toks) => toks[i][l]))]);
      }
      // Counts are exact; the neighbour window holds fewer prompt tokens when chunked.
      const a = chunked.routingForecast(l);
      const b = single.routingForecast(l);
      for (const k of ['nextToken', 'twoBack', 'crossLayer'] as const) close(t, a[k], b[k], `${k}, token ${i}, layer ${l}`);
      t.ok(a.neighbours.every((v) => v >= 0 && v <= 1), 'neighbour votes stay probabilities');
    }
  }
});
