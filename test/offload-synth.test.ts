// synth-trace: a many-request trace whose routing statistics match a real one.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { compareStats, makeRng, RequestRenamer, synthesizeTrace, TraceStats } from '../src/offload/synth-trace.js';
import { loadTrace, tokenExperts } from '../src/offload/trace.js';
import { tempDir } from './helpers/models.js';
import { realTrace } from './helpers/real-traces.js';

const REAL = realTrace('qwen3-30b-a3b');

t.test('synthetic trace matches the real statistics and is deterministic', async (t) => {
  const dir = tempDir(t);
  const out = join(dir, 'a.csv');
  const r = await synthesizeTrace({ like: REAL, out, requests: 20, seed: 7 });

  // Valid format, read back by the project's reader.
  const { header, requests } = await loadTrace(out);
  t.equal(requests.length, 20);
  t.same([header.layers, header.experts, header.topK], [r.header.layers, r.header.experts, r.header.topK]);
  const back = new TraceStats(header);
  for (const req of requests) {
    back.add(req);
    t.ok(req.prefillTokens > 0 && req.prefillTokens < req.tokens.length, 'prefill then decode');
    for (const tok of req.tokens) {
      for (let l = 0; l < header.layers; l++) {
        const ex = tokenExperts(tok, l, header.topK);
        if (ex.length === 0) continue;
        if (new Set(ex).size !== header.topK || ex.some((e) => e >= header.experts)) {
          t.fail(`bad experts at request ${req.id} position ${tok.position} layer ${l}`);
          return;
        }
      }
    }
  }
  const c = compareStats(r.real, back);
  t.same(c, r.comparison, 'statistics of the written file equal the returned ones');
  t.ok(Math.abs(c.reuseMeanReal - c.reuseMeanSynth) < 0.05, `mean reuse ${c.reuseMeanSynth} vs real ${c.reuseMeanReal}`);
  t.ok(c.reuseMaxAbsDiff < 0.1, `per-layer reuse max diff ${c.reuseMaxAbsDiff}`);
  // Cross-layer co-occurrence: clearly better than independent layers (0.280 on this
  // trace; the real trace's first half against its second half differs by 0.183).
  t.ok(c.coocMeanAbsDiff < 0.85 * c.coocIndependentMeanAbsDiff, `co-occurrence diff ${c.coocMeanAbsDiff} vs independent layers ${c.coocIndependentMeanAbsDiff}`);
  t.ok(r.realHalves && r.realHalves.coocMeanAbsDiff > 0.1, `real halves differ by ${r.realHalves?.coocMeanAbsDiff}`);
  // Reuse is coupled across a token's layers, as in the real trace (0.56).
  t.ok(c.keepCorrReal > 0.4, `real keep-count correlation ${c.keepCorrReal}`);
  t.ok(c.keepCorrSynth > 0.25, `synthetic keep-count correlation ${c.keepCorrSynth}`);

  // Baseline: a uniform-random trace of the same size.
  const uni = new TraceStats(header);
  const rng = makeRng(3);
  for (const req of requests) {
    for (const tok of req.tokens) {
      for (let l = 0; l < header.layers; l++) {
        if (tokenExperts(tok, l, header.topK).length === 0) continue;
        const picked = new Set<number>();
        while (picked.size < header.topK) picked.add(Math.floor(rng() * header.experts));
        tok.experts.set([...picked], l * header.topK);
      }
    }
    uni.add(req);
  }
  const cu = compareStats(r.real, uni);
  t.ok(c.popularityTV < cu.popularityTV / 3, `popularity TV ${c.popularityTV} vs uniform random ${cu.popularityTV}`);
  t.ok(c.popularityTV < 0.08, `popularity TV ${c.popularityTV}`);
  t.ok(cu.coocMeanAbsDiff > c.coocMeanAbsDiff, `uniform random co-occurrence diff ${cu.coocMeanAbsDiff}`);

  // Same seed, same bytes; another seed differs.
  const out2 = join(dir, 'b.csv');
  await synthesizeTrace({ like: REAL, out: out2, requests: 20, seed: 7 });
  t.ok(readFileSync(out).equals(readFileSync(out2)), 'identical bytes for the same seed');
  const out3 = join(dir, 'c.csv');
  const r3 = await synthesizeTrace({ like: REAL, out: out3, requests: 3, seed: 8, requestVariation: 0.5, topics: 2 });
  t.notOk(readFileSync(out3).equals(readFileSync(out).subarray(0, readFileSync(out3).length)), 'another seed differs');
  // With renaming, `written` holds the file's statistics and `synth` the requests' before renaming.
  t.not(r3.written, r3.synth);
  const back3 = new TraceStats(r3.header);
  for (const req of (await loadTrace(out3)).requests) back3.add(req);
  t.same(Array.from(back3.counts), Array.from(r3.written.counts), 'written statistics are the file\'s');
  t.same(Array.from(back3.reuseSum), Array.from(r3.synth.reuseSum), 'renaming keeps each request\'s reuse');
});

t.test('request renaming keeps within-request statistics and spreads popularity across topics', async (t) => {
  const { header, requests } = await loadTrace(REAL);
  const { layers: L, experts: E } = header;
  const copies = (n: number) => Array.from({ length: n }, (_, i) => ({ ...requests[0], id: i, tokens: requests[0].tokens.map((tok) => ({ ...tok, experts: tok.experts.slice() })) }));
  const base = new TraceStats(header);
  for (const req of copies(8)) base.add(req);

  const sortedCounts = (s: TraceStats, l: number) => Array.from(s.counts.subarray(l * E, (l + 1) * E)).sort((a, b) => a - b);
  const run = (variation: number, topics: number) => {
    const renamer = new RequestRenamer(header, variation, topics, makeRng(5));
    const s = new TraceStats(header);
    const reqs = copies(8);
    for (const req of reqs) {
      renamer.apply(req);
      s.add(req);
    }
    return { s, reqs };
  };

  // One topic: every request renamed alike, so each layer's popularity is a permutation of the original's.
  const one = run(1, 1);
  t.same(Array.from(one.s.reuseSum), Array.from(base.reuseSum), 'reuse per layer unchanged');
  t.same(Array.from(one.s.keepTrans), Array.from(base.keepTrans), 'keep-count chain unchanged');
  let permuted = true;
  let moved = 0;
  for (let l = 0; l < L; l++) {
    if (sortedCounts(one.s, l).join() !== sortedCounts(base, l).join()) permuted = false;
    for (let e = 0; e < E; e++) if (one.s.counts[l * E + e] !== base.counts[l * E + e]) moved++;
  }
  t.ok(permuted, 'one topic: popularity per layer is a permutation of the original');
  t.ok(moved > L * 10, `experts renamed (${moved} (layer, expert) counts moved)`);
  t.same(one.reqs[3].tokens[50].experts, one.reqs[5].tokens[50].experts, 'requests of one topic are renamed alike');

  // A topic per request: same within-request statistics, flatter pooled popularity.
  const many = run(1, 8);
  t.same(Array.from(many.s.reuseSum), Array.from(base.reuseSum), 'reuse per layer unchanged');
  const flat = compareStats(many.s, many.s).popularityTVUniform;
  const orig = compareStats(base, base).popularityTVUniform;
  t.ok(flat < 0.8 * orig, `pooled popularity flatter: TV to uniform ${flat} vs ${orig}`);

  // Variation 0 renames nothing; out-of-range settings are refused.
  const none = run(0, 8);
  t.same(Array.from(none.s.counts), Array.from(base.counts), 'variation 0: unchanged');
  t.throws(() => new RequestRenamer(header, 1.5, 1, makeRng(1)));
  t.throws(() => new RequestRenamer(header, 0.5, 0, makeRng(1)));
});
