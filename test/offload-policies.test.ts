// Cache policies: LRU / LFU on hand-made sequences, Belady against brute force, and the
// policies on the shipped real traces; the simulator's batching and the sim command.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { BeladyPolicy } from '../src/offload/belady.js';
import type { ExpertCachePolicy, SlotCache } from '../src/offload/cache-policy.js';
import { ForecastPolicy, type ForecastModel } from '../src/offload/forecast.js';
import { fitForecastPrior, priorModule } from '../src/offload/forecast-fit.js';
import { FORECAST_PRIOR } from '../src/offload/forecast-prior.js';
import { LfuPolicy } from '../src/offload/lfu.js';
import { LruPolicy } from '../src/offload/lru.js';
import { buildSchedule } from '../src/offload/schedule.js';
import { createCachePolicy, DEFAULT_POLICY, DEFAULT_TIMING, simulate, type PolicyName } from '../src/offload/simulator.js';
import { loadTrace } from '../src/offload/trace.js';
import { main } from '../src/cli/main.js';
import { simCommand } from '../src/cli/sim-cmd.js';
import { UsageError } from '../src/cli/args.js';
import { Rng } from '../src/model/prng.js';
import { tempDir } from './helpers/models.js';
import { realTrace } from './helpers/real-traces.js';

const TRACES = ['qwen3-30b-a3b', 'gemma4-26b-a4b'].map(realTrace);

function replay(p: SlotCache, seq: number[][]) {
  let hits = 0;
  let loads = 0;
  const evicted: number[] = [];
  for (const set of seq) {
    const d = p.request(0, set);
    hits += d.hits.length;
    loads += d.loads.length;
    evicted.push(...d.evictions.map((e) => e.expert));
  }
  return { hits, loads, evicted };
}

const one = (capacity: number, experts = 8) => ({ layers: 1, experts, capacity });

t.test('LRU and LFU on hand-made sequences', async (t) => {
  const seq = [[1], [1], [2], [3], [2], [1]];
  // LRU, 2 slots: 1m 1h 2m 3m(evict 1) 2h 1m(evict 3)
  t.same(replay(new LruPolicy(one(2)), seq), { hits: 2, loads: 4, evicted: [1, 3] });
  // LFU, 2 slots: 1m 1h 2m 3m(evict 2: 1 use vs 2) 2m(evict 3: 1 use vs 1's 2) 1h
  t.same(replay(new LfuPolicy(one(2)), seq), { hits: 2, loads: 4, evicted: [2, 3] });
  // Slots are reused and reported.
  const p = new LruPolicy(one(2));
  t.same(p.request(0, [4, 5]).loads, [{ expert: 4, slot: 0 }, { expert: 5, slot: 1 }]);
  t.same(p.request(0, [6]), { layer: 0, hits: [], prefetchHits: [], loads: [{ expert: 6, slot: 0 }], evictions: [{ expert: 4, slot: 0 }] });
  // A visit's own experts are never evicted to serve it.
  t.same(p.request(0, [5, 7]).evictions, [{ expert: 6, slot: 0 }]);
});

t.test('pinning keeps an expert; prefetch cancel frees its slot', async (t) => {
  const p = new LruPolicy(one(2));
  p.request(0, [1]);
  t.ok(p.pin(0, 1));
  t.notOk(p.pin(0, 9), 'not resident');
  p.request(0, [2]);
  p.request(0, [3]);
  p.request(0, [4]);
  t.ok(p.slotOf(0, 1) >= 0, 'pinned expert stayed');
  p.unpin(0, 1);
  p.request(0, [5]);
  p.request(0, [6]);
  t.equal(p.slotOf(0, 1), -1);
  const issued = p.prefetch(0, [{ expert: 7, priority: 0.9 }, { expert: 6, priority: 0.8 }], 4);
  t.same(issued.map((x) => x.expert), [7], 'resident hint skipped');
  p.cancelPrefetch(0, 7);
  t.equal(p.slotOf(0, 7), -1, 'cancelled prefetch frees its slot');
  t.same(p.stats().prefetchCancelled, 1);
  t.same(p.stats().prefetchIssued, 0, 'a cancelled prefetch is no load');
});

/** Minimum demand loads over all eviction choices (sets need all members resident). */
function bruteForce(seq: number[][], capacity: number): number {
  const memo = new Map<string, number>();
  const go = (i: number, cache: number[]): number => {
    if (i === seq.length) return 0;
    const key = `${i}|${cache.join(',')}`;
    const m = memo.get(key);
    if (m !== undefined) return m;
    const set = seq[i];
    const missing = set.filter((e) => !cache.includes(e));
    // Place misses one at a time, branching over victims not in the set.
    let best = Infinity;
    const place = (c: number[], j: number) => {
      if (j === missing.length) {
        best = Math.min(best, missing.length + go(i + 1, [...c].sort((a, b) => a - b)));
        return;
      }
      if (c.length < capacity) return place([...c, missing[j]], j + 1);
      for (const v of c) if (!set.includes(v)) place([...c.filter((x) => x !== v), missing[j]], j + 1);
    };
    place(cache, 0);
    memo.set(key, best);
    return best;
  };
  return go(0, []);
}

t.test('Belady is optimal on small random sequences (brute force)', async (t) => {
  const rng = new Rng(7);
  for (let trial = 0; trial < 150; trial++) {
    const E = 3 + (rng.u32() % 4);
    const C = 2 + (rng.u32() % 2);
    const len = 6 + (rng.u32() % 8);
    const seq: number[][] = [];
    for (let i = 0; i < len; i++) {
      const k = 1 + (rng.u32() % Math.min(2, C));
      const set = new Set<number>();
      while (set.size < k) set.add(rng.u32() % E);
      seq.push([...set]);
    }
    const opt = bruteForce(seq, C);
    const b = replay(new BeladyPolicy(one(C, E), { visits: len, set: (_l, i) => seq[i] }), seq);
    if (b.loads !== opt) {
      t.fail(`trial ${trial}: belady ${b.loads} vs optimum ${opt} on ${JSON.stringify(seq)} cap ${C}`);
      return;
    }
    const lru = replay(new LruPolicy(one(C, E)), seq);
    if (lru.loads < opt) t.fail('LRU beat the optimum: brute force is wrong');
  }
  t.pass('150 random sequences');
});

t.test('real traces: belady <= every policy; predictive <= lru; forecast beats the others', async (t) => {
  for (const f of TRACES) {
    const { header, requests } = await loadTrace(f);
    const sched = await buildSchedule(header, requests, { concurrency: 1 });
    for (const m of [1, 2, 4]) {
      const cap = m * header.topK;
      const loads = (n: PolicyName) => simulate(sched, createCachePolicy(n, sched, cap)).loads;
      const b = loads('belady');
      const lru = loads('lru');
      const lfu = loads('lfu');
      const decay = loads('lfu-decay');
      const old = loads('predictive');
      const ours = loads('forecast');
      t.ok(b <= lru && b <= lfu && b <= decay && b <= old && b <= ours, `${f} ${m}x: belady ${b} <= lru ${lru}, lfu ${lfu}, lfu-decay ${decay}, predictive ${old}, forecast ${ours}`);
      t.ok(old <= lru, `${f} ${m}x: predictive ${old} <= lru ${lru}`);
      if (m > 1) t.ok(ours < old && ours < decay && ours < lru, `${f} ${m}x: forecast ${ours} < predictive ${old}, lfu-decay ${decay}, lru ${lru}`);
    }
  }
});

/** Random routing with reuse (a sticky expert set per layer), `seqs` sequences per step. */
function randomSteps(rng: Rng, steps: number, L: number, E: number, K: number, seqs: number) {
  const cur = Array.from({ length: seqs * L }, () => Array.from({ length: K }, (_, k) => k));
  const out: { seq: number; experts: number[] }[][][] = []; // step -> layer -> tokens
  for (let s = 0; s < steps; s++) {
    const layers: { seq: number; experts: number[] }[][] = [];
    for (let l = 0; l < L; l++) {
      const toks: { seq: number; experts: number[] }[] = [];
      for (let q = 0; q < seqs; q++) {
        const prev = cur[q * L + l];
        const next = new Set<number>();
        for (const e of prev) if (rng.u32() % 3 === 0) next.add(e);
        while (next.size < K) next.add(rng.u32() % 4 === 0 ? rng.u32() % E : (l * 5 + (rng.u32() % 12)) % E);
        cur[q * L + l] = [...next];
        toks.push({ seq: q + 100 * Math.floor(s / 40), experts: [...next] });
      }
      layers.push(toks);
    }
    out.push(layers);
  }
  return out;
}

/** Drives a policy online (observeRouting + request + prefetch), checking the slot invariants. */
function driveOnline(t: Test, p: ExpertCachePolicy & { observeRouting?: ForecastPolicy['observeRouting'] }, steps: ReturnType<typeof randomSteps>, opts: { observe: boolean; prefetch: boolean }) {
  const L = p.layers;
  let loads = 0;
  let ok = true;
  const trace: string[] = [];
  for (const layers of steps) {
    for (let l = 0; l < L; l++) {
      const toks = layers[l];
      const union = [...new Set(toks.flatMap((x) => x.experts))];
      if (opts.observe) p.observeRouting?.(l, toks);
      const d = p.request(l, union);
      loads += d.loads.length;
      trace.push(`${l}:${d.loads.map((x) => `${x.expert}@${x.slot}`).join(',')}/${d.evictions.map((x) => x.expert).join(',')}`);
      // Invariants: every needed expert is resident after the request (when it fits), at
      // most the layer's capacity of residents, in its slots, slots and experts consistent.
      const C = p.capacityOf(l);
      const res = (p as unknown as SlotCache).resident(l);
      if (res.length > C || new Set(res).size !== res.length) ok = false;
      for (const e of res) if (p.slotOf(l, e) < 0 || p.slotOf(l, e) >= C) ok = false;
      if (union.length <= C) for (const e of union) if (p.slotOf(l, e) < 0) ok = false;
      for (const x of d.loads) if (x.slot < 0 || x.slot >= C) ok = false;
      if (opts.prefetch && l + 1 < L) {
        const hints = [...new Set(layers[l + 1].flatMap((x) => x.experts))].slice(0, 2).map((e, i) => ({ expert: e, priority: 0.9 - i * 0.1 }));
        const issued = p.prefetch(l + 1, hints, 2);
        loads += issued.length;
        if ((p as unknown as SlotCache).resident(l + 1).length > p.capacityOf(l + 1)) ok = false;
        for (const x of issued) if (x.slot < 0 || x.slot >= p.capacityOf(l + 1)) ok = false;
      }
    }
  }
  if (!ok) t.fail('slot invariant broken');
  return { loads, trace: trace.join(' ') };
}

t.test('forecast: capacity, determinism, loads >= belady, online use without observe', async (t) => {
  const L = 3;
  const E = 24;
  const K = 3;
  for (const seqs of [1, 3]) {
    for (const cap of [3, 5, 8]) {
      const steps = randomSteps(new Rng(5 + seqs * 7 + cap), 120, L, E, K, seqs);
      const shape = { layers: L, experts: E, capacity: cap };
      const a = driveOnline(t, new ForecastPolicy(shape), steps, { observe: true, prefetch: false });
      const b = driveOnline(t, new ForecastPolicy(shape), steps, { observe: true, prefetch: false });
      t.equal(a.trace, b.trace, `deterministic (seqs ${seqs}, cap ${cap})`);
      const plain = driveOnline(t, new ForecastPolicy(shape), steps, { observe: false, prefetch: false });
      t.ok(plain.loads > 0, 'runs on request() alone');
      driveOnline(t, new ForecastPolicy(shape), steps, { observe: true, prefetch: true });
      // Belady on the same visit sets (it is optimal when a visit fits the capacity).
      const sets = (l: number, i: number) => [...new Set(steps[i][l].flatMap((x) => x.experts))];
      const fits = steps.every((st) => st.every((toks) => new Set(toks.flatMap((x) => x.experts)).size <= cap));
      if (fits) {
        const opt = new BeladyPolicy(shape, { visits: steps.length, set: sets });
        let bl = 0;
        for (let i = 0; i < steps.length; i++) for (let l = 0; l < L; l++) bl += opt.request(l, sets(l, i)).loads.length;
        t.ok(a.loads >= bl && plain.loads >= bl, `cap ${cap} seqs ${seqs}: forecast ${a.loads} / ${plain.loads} >= belady ${bl}`);
      }
    }
  }
});

t.test('unequal capacities per layer: every policy keeps each layer within its own slots', async (t) => {
  const L = 3;
  const E = 24;
  const caps = [7, 2, 4];
  const steps = randomSteps(new Rng(21), 150, L, E, 3, 2);
  const sets = (l: number, i: number) => [...new Set(steps[i][l].flatMap((x) => x.experts))];
  const shape = { layers: L, experts: E, capacity: caps };
  const policies: [string, () => ExpertCachePolicy][] = [
    ['lru', () => new LruPolicy(shape)],
    ['lfu', () => new LfuPolicy(shape)],
    ['lfu-decay', () => new LfuPolicy(shape, { halfLife: 4 })],
    ['forecast', () => new ForecastPolicy(shape)],
    ['belady', () => new BeladyPolicy(shape, { visits: steps.length, set: sets })],
  ];
  for (const [name, make] of policies) {
    const p = make();
    t.same(p.capacities, caps, `${name}: capacities`);
    t.same(caps.map((_, l) => p.capacityOf(l)), caps);
    for (const prefetch of [false, true]) driveOnline(t, make(), steps, { observe: true, prefetch });
    // Each layer fills exactly its own slots.
    const q = make();
    for (let i = 0; i < steps.length; i++) for (let l = 0; l < L; l++) q.request(l, sets(l, i));
    for (let l = 0; l < L; l++) t.equal((q as unknown as SlotCache).resident(l).length, caps[l], `${name}: layer ${l} full at ${caps[l]}`);
  }
  // Layers share nothing: with per-layer rules (LRU, LFU, Belady) a layer of the split
  // cache decides exactly as a one-layer cache of its capacity.
  for (const [name, make] of policies.filter(([n]) => n !== 'forecast')) {
    const p = make();
    const got: string[][] = caps.map(() => []);
    for (let i = 0; i < steps.length; i++) {
      for (let l = 0; l < L; l++) {
        const d = p.request(l, sets(l, i));
        got[l].push(JSON.stringify([d.hits, d.loads, d.evictions]));
      }
    }
    for (let l = 0; l < L; l++) {
      const single = { layers: 1, experts: E, capacity: caps[l] };
      const s1 =
        name === 'lru' ? new LruPolicy(single) : name === 'lfu' ? new LfuPolicy(single) : name === 'lfu-decay' ? new LfuPolicy(single, { halfLife: 4 }) : new BeladyPolicy(single, { visits: steps.length, set: (_x, i) => sets(l, i) });
      const want = steps.map((_, i) => {
        const d = s1.request(0, sets(l, i));
        return JSON.stringify([d.hits, d.loads, d.evictions]);
      });
      t.same(got[l], want, `${name}: layer ${l} (capacity ${caps[l]}) decides as a one-layer cache of ${caps[l]}`);
    }
  }
  t.throws(() => new LruPolicy({ layers: 3, experts: 8, capacity: [2, 2] }), /2 layer capacities for 3 layers/);
  t.throws(() => new LruPolicy({ layers: 2, experts: 8, capacity: [2, 0] }), /must be an integer >= 1, got 0 for layer 1/);
  t.throws(() => new LruPolicy({ layers: 2, experts: 8, capacity: [2, 1.5] }), /got 1.5 for layer 1/);
  t.same(new LruPolicy({ layers: 2, experts: 8, capacity: [3, 20] }).capacities, [3, 8], 'clamped to the experts');
});

t.test('Belady is the optimum of each layer at its own capacity (brute force)', async (t) => {
  const rng = new Rng(13);
  for (let trial = 0; trial < 60; trial++) {
    const L = 3;
    const E = 3 + (rng.u32() % 4);
    const caps = Array.from({ length: L }, () => 1 + (rng.u32() % 3));
    const len = 6 + (rng.u32() % 6);
    const seqs = caps.map((C) =>
      Array.from({ length: len }, () => {
        const k = 1 + (rng.u32() % Math.min(2, C));
        const set = new Set<number>();
        while (set.size < k) set.add(rng.u32() % E);
        return [...set];
      }),
    );
    const p = new BeladyPolicy({ layers: L, experts: E, capacity: caps }, { visits: len, set: (l, i) => seqs[l][i] });
    const loads = new Array<number>(L).fill(0);
    for (let i = 0; i < len; i++) for (let l = 0; l < L; l++) loads[l] += p.request(l, seqs[l][i]).loads.length;
    const opt = caps.map((C, l) => bruteForce(seqs[l], C));
    if (loads.some((x, l) => x !== opt[l])) {
      t.fail(`trial ${trial}: belady ${loads} vs optimum ${opt} at capacities ${caps} on ${JSON.stringify(seqs)}`);
      return;
    }
  }
  t.pass('60 random three-layer sequences at unequal capacities');
});

t.test('forecast: prefetches are counted as loads, wasted ones included', async (t) => {
  const { header, requests } = await loadTrace(TRACES[0]);
  const sched = await buildSchedule(header, requests.map((r) => ({ ...r, tokens: r.tokens.slice(0, 60) })), { concurrency: 1 });
  const p = new ForecastPolicy({ layers: header.layers, experts: header.experts, capacity: 12 }, { prefetchMin: 0.2 });
  const r = simulate(sched, p);
  t.ok(r.prefetch.issued > 0, `prefetches issued (${r.prefetch.issued})`);
  t.equal(r.loads, r.demandLoads + r.prefetch.issued, 'loads = demand loads + started prefetches');
  t.equal(r.prefetch.issued, r.prefetch.used + r.prefetch.wasted, 'every started prefetch is used or wasted');
  const b = simulate(sched, createCachePolicy('belady', sched, 12)).loads;
  t.ok(r.loads >= b, `with prefetch ${r.loads} >= belady ${b}`);
});

t.test("oracle prefetch: told each next layer's experts, stall-free bounds what one-layer-ahead prefetching can reach", async (t) => {
  const { header, requests } = await loadTrace(TRACES[0]);
  const sched = await buildSchedule(header, requests.map((r) => ({ ...r, tokens: r.tokens.slice(0, 60) })), { concurrency: 1 });
  const cap = 4 * header.topK;
  const timing = { ...DEFAULT_TIMING, loadBandwidth: 2.4e9 };
  const demand = simulate(sched, createCachePolicy('belady', sched, cap), timing);
  const oracle = simulate(sched, createCachePolicy('belady', sched, cap), timing, { oraclePrefetch: true });
  t.equal(oracle.prefetch.wasted, 0, 'an oracle prefetch is never wasted');
  t.ok(oracle.prefetch.issued > 0, `prefetches issued (${oracle.prefetch.issued})`);
  t.ok(oracle.stallFreeFraction > demand.stallFreeFraction, `stall-free ${oracle.stallFreeFraction.toFixed(3)} > demand-only ${demand.stallFreeFraction.toFixed(3)}`);
  t.ok(oracle.stallFreeFraction < 1, 'loads slower than a layer of compute still stall');
  // With loads far faster than compute, every visit after layer 0 can be served ahead.
  const fast = simulate(sched, createCachePolicy('belady', sched, cap), { ...timing, loadBandwidth: 1e15 }, { oraclePrefetch: true });
  const layer0 = 1 / header.layers;
  t.ok(fast.stallFreeFraction >= 1 - layer0 - 1e-9, `instant loads: stall-free ${fast.stallFreeFraction.toFixed(3)} (layer 0 is never prefetched)`);
});

t.test('forecast on the real traces: loads vs belady at 2x the active experts (issue 5 target 1.25)', async (t) => {
  t.equal(DEFAULT_POLICY, 'forecast');
  // Measured 1.258 (qwen3, out of sample: the shipped prior was fitted on gemma4) and
  // 1.258 (gemma4, in sample; 1.2545 from a prior fitted on qwen3) at concurrency 1; the
  // target of 1.25 is not met.
  const bound: Record<string, number> = { 'qwen3-30b-a3b': 1.265, 'gemma4-26b-a4b': 1.27 };
  for (const f of TRACES) {
    const { header, requests } = await loadTrace(f);
    const sched = await buildSchedule(header, requests, { concurrency: 1 });
    const cap = 2 * header.topK;
    const b = simulate(sched, createCachePolicy('belady', sched, cap)).loads;
    const ours = simulate(sched, createCachePolicy('forecast', sched, cap)).loads;
    const key = Object.keys(bound).find((k) => f.includes(k))!;
    t.ok(ours / b <= bound[key], `${key}: forecast/belady = ${(ours / b).toFixed(3)} <= ${bound[key]}`);
  }
});

/** A synthetic trace of `n` requests with request-dependent lengths and routing. */
function syntheticTrace(n: number, L = 4, E = 32, K = 2): string {
  const rng = new Rng(11);
  let s = `# moe-trace v1\n# model=synthetic layers=${L} experts=${E} top_k=${K} source=test\nrequest,phase,position,layer,experts,weights\n`;
  for (let r = 0; r < n; r++) {
    const prompt = 1 + (r % 3);
    const len = prompt + 2 + (r % 5);
    for (let p = 0; p < len; p++) {
      for (let l = 0; l < L; l++) {
        const a = (r * 7 + l * 3 + (rng.u32() % 4)) % E;
        const b = (a + 1 + (rng.u32() % (E - 1))) % E;
        s += `${r},${p < prompt ? 'prefill' : 'decode'},${p},${l},${a} ${b},\n`;
      }
    }
  }
  return s;
}

t.test('concurrency interleaves requests, one token each per step', async (t) => {
  const dir = tempDir(t);
  const f = join(dir, 'many.csv');
  writeFileSync(f, syntheticTrace(40));
  const { header, requests } = await loadTrace(f);
  const total = requests.reduce((a, r) => a + r.tokens.length, 0);
  const s1 = await buildSchedule(header, requests, { concurrency: 1 });
  t.equal(s1.numSteps, total, 'one token per step at concurrency 1');
  const s8 = await buildSchedule(header, requests, { concurrency: 8 });
  t.ok(s8.numSteps < total / 4, `8 lanes take far fewer steps (${s8.numSteps} vs ${total})`);
  t.equal(s8.steps[0].length, 8);
  t.same(s8.steps[0].map((x) => x.request), [0, 1, 2, 3, 4, 5, 6, 7], 'first 8 requests start together');
  // Each request's tokens come in order, one per step, and a finished lane is refilled.
  const seen = new Map<number, number>();
  let ok = true;
  for (const step of s8.steps) {
    const lanes = new Set<number>();
    for (const x of step) {
      ok &&= !lanes.has(x.lane) && (seen.get(x.request) ?? -1) + 1 === x.index;
      lanes.add(x.lane);
      seen.set(x.request, x.index);
    }
  }
  t.ok(ok, 'tokens in order, one per lane per step');
  t.equal(seen.size, 40);
  const r0end = s8.steps.findIndex((st) => st.some((x) => x.request === 8));
  t.equal(r0end, requests[0].tokens.length, 'request 8 joins the step after request 0 ends');
  // Union per visit.
  const st = s8.steps[0];
  const union = new Set(st.flatMap((x) => Array.from(x.token.experts.subarray(0, 2))));
  t.same([...s8.set(0, 0)].sort((a, b) => a - b), [...union].sort((a, b) => a - b));
  const r = simulate(s8, createCachePolicy('predictive', s8, 8));
  t.ok(r.hitRate > 0 && r.hitRate < 1);
});

async function runCli(args: string[]): Promise<{ code: number; out: string }> {
  const write = process.stdout.write;
  let out = '';
  process.stdout.write = ((chunk: string | Uint8Array) => {
    out += String(chunk);
    return true;
  }) as typeof process.stdout.write;
  try {
    const code = await main(args);
    return { code, out };
  } finally {
    process.stdout.write = write;
  }
}

t.test('sim --json', async (t) => {
  const r = await runCli(['sim', '--trace', TRACES[0], '--json']);
  t.equal(r.code, 0);
  const j = JSON.parse(r.out);
  t.equal(j.capacities.length, 3);
  for (const c of j.capacities) for (const k of ['hit_rate', 'loads', 'belady_loads', 'loads_vs_belady', 'stall_free_fraction']) t.type(c[k], 'number', k);
  const one = JSON.parse((await runCli(['sim', '--trace', TRACES[1], '--policy', 'lru', '--capacity', '2.0', '--json'])).out);
  t.equal(one.capacity_per_layer, 12);
  t.ok(one.loads_vs_belady > 1);
  const dir = tempDir(t);
  const f = join(dir, 'many.csv');
  writeFileSync(f, syntheticTrace(30));
  const c8 = JSON.parse((await runCli(['sim', '--trace', f, '--concurrency', '8', '--capacity', '6', '--json'])).out);
  t.equal(c8.requests, 30);
  t.ok(c8.mean_distinct_experts_per_visit > 2, 'visits need the union of 8 tokens');
  const help = await runCli(['sim', '--help']);
  t.match(help.out, /continuous batching/);
});

t.test('sim --split: the same slot budget split by layer weights', async (t) => {
  const dir = tempDir(t);
  const f = join(dir, 'split.csv');
  writeFileSync(f, syntheticTrace(30)); // 4 layers, 32 experts, top-2
  const sim = async (...args: string[]) => JSON.parse((await runCli(['sim', '--trace', f, '--policy', 'lru', '--json', ...args])).out);
  const eq = await sim('--capacity', '4');
  t.equal(eq.split, 'equal');
  t.same(eq.slots_by_layer, [4, 4, 4, 4]);
  t.equal(eq.total_slots, 16);
  t.equal(eq.capacity_per_layer, 4);
  // Equal weights on a budget that divides evenly: the equal split, the same loads.
  const ones = await sim('--capacity', '4', '--split', '1,1,1,1');
  t.equal(ones.split, '1,1,1,1');
  t.same(ones.slots_by_layer, [4, 4, 4, 4]);
  t.equal(ones.loads, eq.loads);
  t.equal(ones.belady_loads, eq.belady_loads);
  // 16 slots: the zero weights keep one each, 14 go 3:1 (10.5, 3.5 → 11, 3: equal remainders, the lower layer first).
  const sp = await sim('--capacity', '4', '--split', '3,1,0,0');
  t.same(sp.slots_by_layer, [11, 3, 1, 1]);
  t.equal(sp.total_slots, 16, 'the total budget is the capacity x layers');
  t.equal(sp.capacity_per_layer, 4, 'capacity_per_layer is the mean over layers');
  t.not(sp.loads, eq.loads, 'a different split, different loads');
  // The policy and Belady both ran at the split's slots per layer.
  const { header, requests } = await loadTrace(f);
  const sched = await buildSchedule(header, requests, { concurrency: 1 });
  t.equal(sp.loads, simulate(sched, createCachePolicy('lru', sched, [11, 3, 1, 1])).loads, 'lru at 11, 3, 1, 1');
  t.equal(sp.belady_loads, simulate(sched, createCachePolicy('belady', sched, [11, 3, 1, 1])).loads, 'belady at the same split');
  t.ok(sp.belady_loads <= sp.loads);
  // --total-capacity: the whole budget with a split, floor(N / L) per layer without.
  t.same((await sim('--total-capacity', '18', '--split', '1,1,1,1')).slots_by_layer, [5, 5, 4, 4]);
  t.same((await sim('--total-capacity', '18')).slots_by_layer, [4, 4, 4, 4]);
  // Without a capacity: 1x, 2x and 4x top-k, each budget split.
  const three = await sim('--split', '1,1,0,2');
  t.same(three.capacities.map((c: { total_slots: number }) => c.total_slots), [8, 16, 32]);
  t.same(three.capacities[0].slots_by_layer, [2, 2, 1, 3]);
  // The text report lists the slots of each layer.
  const text = (await runCli(['sim', '--trace', f, '--policy', 'lru', '--capacity', '4', '--split', '3,1,0,0'])).out;
  t.match(text, /split +by layer weights 3,1,0,0/);
  t.match(text, /16 slots: 11 3 1 1/);
  // Errors name the flag and what was expected.
  await t.rejects(simCommand.run(['--trace', f, '--split', '1,2']), UsageError);
  await t.rejects(simCommand.run(['--trace', f, '--split', '1,2']), /--split: expert cache split "1,2": 2 weights, but the trace has 4 layers \(one weight per layer is needed\)/);
  await t.rejects(simCommand.run(['--trace', f, '--split', '1,-2,1,1']), /--split: expert cache split "1,-2,1,1": weight 2 \("-2"\) is negative/);
  await t.rejects(simCommand.run(['--trace', f, '--split', '0,0,0,0']), /every weight is 0/);
  await t.rejects(simCommand.run(['--trace', f, '--total-capacity', '3', '--split', '1,1,1,1']), /--total-capacity must be an integer in \[4, /, 'a layer needs a slot');
  await t.rejects(simCommand.run(['--trace', f, '--scheduler', 'fcfs', '--split', '1,1,1,1']), /--split is for the cache simulation, not --scheduler/);
  t.match((await runCli(['sim', '--help'])).out, /--split equal\|W0,W1,\.\.\./);
});

t.test('forecast: a sequence that sits out a step keeps its history when the caller ends sequences', async (t) => {
  const shape = { layers: 2, experts: 8, capacity: 4 };
  const route = (p: ForecastPolicy, seqs: { seq: number; experts: number[] }[]) => {
    for (let l = 0; l < shape.layers; l++) {
      p.observeRouting(l, seqs.map((s) => ({ seq: s.seq, experts: Int32Array.from(s.experts) })));
      p.request(l, [...new Set(seqs.flatMap((s) => s.experts))]);
    }
  };
  // Implicit ends (the simulator's contract): absent from a step's last layer = finished.
  const implicit = new ForecastPolicy(shape);
  route(implicit, [{ seq: 1, experts: [0, 1] }, { seq: 2, experts: [2, 3] }]);
  route(implicit, [{ seq: 2, experts: [2, 4] }]);
  t.same(implicit.predictor.sequences().sort(), [2], 'sequence 1 taken as finished');
  // Explicit ends (the offload runner): sitting out keeps the history until endSequence.
  const explicit = new ForecastPolicy(shape);
  explicit.useExplicitEnds();
  route(explicit, [{ seq: 1, experts: [0, 1] }, { seq: 2, experts: [2, 3] }]);
  route(explicit, [{ seq: 2, experts: [2, 4] }]);
  t.same(explicit.predictor.sequences().sort(), [1, 2], 'sequence 1 kept while it sits out');
  explicit.endSequence(1);
  t.same(explicit.predictor.sequences(), [2], 'sequence 1 dropped by endSequence');
});

t.test('forecast without its routing predictor (the runner): the same cache decisions and next-visit hints, no predictor updates', async (t) => {
  const shape = { layers: 3, experts: 16, capacity: 5 };
  const rng = new Rng(31);
  const withP = new ForecastPolicy(shape, { prefetchMin: 0.05 });
  const without = new ForecastPolicy(shape, { prefetchMin: 0.05, routingPredictor: false });
  let sameDecisions = 0;
  let sameHints = 0;
  let hinted = 0;
  const visits = 60 * shape.layers;
  for (let step = 0; step < 60; step++) {
    for (let l = 0; l < shape.layers; l++) {
      const seqs = [1, 2].map((seq) => ({ seq, experts: Int32Array.from(new Set(Array.from({ length: 3 }, () => (rng.u32() % 6) + (seq === 2 ? rng.u32() % 10 : 0)))) }));
      const need = [...new Set(seqs.flatMap((s) => [...s.experts]))];
      const d = [withP, without].map((p) => {
        p.observeRouting(l, seqs);
        return p.request(l, need);
      });
      if (JSON.stringify(d[0]) === JSON.stringify(d[1])) sameDecisions++;
      const h = [withP, without].map((p) => p.nextVisitHints(l));
      if (JSON.stringify(h[0]) === JSON.stringify(h[1])) sameHints++;
      if (h[0].length > 0) hinted++;
    }
  }
  t.equal(sameDecisions, visits, 'every visit decided alike');
  t.equal(sameHints, visits, 'every next-visit forecast alike');
  t.ok(hinted > 0, `next-visit hints were made (${hinted} visits)`);
  t.same(without.predictor.sequences(), [], 'the predictor was not updated');
  t.ok(withP.predictor.sequences().length > 0);
  t.throws(() => without.prefetchHints(0, []), /needs the routing predictor/);
});

t.test('forecast: examples whose features are taken at idle() (as the runner does while reads are in flight) teach the same model', async (t) => {
  // The runner calls idle() while a visit waits for reads; between a visit and that call
  // the next-visit prefetches change the layer's residents. Taking the examples' features
  // there, or at the next request(), must leave every decision and the model the same.
  const shape = { layers: 3, experts: 48, capacity: 8 };
  const rng = new Rng(47);
  const plain = new ForecastPolicy(shape, { prefetchMin: 0.05, routingPredictor: false });
  const idling = new ForecastPolicy(shape, { prefetchMin: 0.05, routingPredictor: false });
  const visits = 200 * shape.layers;
  let same = 0;
  let prefetched = 0;
  for (let step = 0; step < 200; step++) {
    for (let l = 0; l < shape.layers; l++) {
      const seqs = [1, 2].map((seq) => ({ seq, experts: Int32Array.from(new Set(Array.from({ length: 3 }, () => (rng.u32() % 6) + (seq === 2 ? rng.u32() % 40 : 0)))) }));
      const need = [...new Set(seqs.flatMap((s) => [...s.experts]))];
      const idleAt = rng.u32() % 3; // before the prefetch, after it, or not at all
      const out = [plain, idling].map((p) => {
        p.observeRouting(l, seqs);
        const d = p.request(l, need);
        if (p === idling && idleAt === 0) p.idle();
        const issued = p.prefetchNextVisit(l, p.nextVisitHints(l), 2);
        if (p === idling && idleAt === 1) p.idle();
        return JSON.stringify([d, issued]);
      });
      if (out[0] === out[1]) same++;
      if (JSON.parse(out[0])[1].length > 0) prefetched++;
    }
  }
  t.equal(same, visits, 'every visit and next-visit prefetch decided alike');
  t.ok(prefetched > 20, `next-visit prefetches changed the residents between visits (${prefetched} visits)`);
  const a = plain.model();
  const b = idling.model();
  t.same(b.w, a.w, 'the same weights');
  t.same(b.g2, a.g2, 'the same Adagrad sums');
  t.not(JSON.stringify(a.w), JSON.stringify(FORECAST_PRIOR.w), 'the model learned from the examples');
});

t.test("forecast: next-visit hints skip experts by a bound of their forecast, and are the full forecast's", async (t) => {
  const { header, requests } = await loadTrace(TRACES[0]);
  const sched = await buildSchedule(header, requests, { concurrency: 1 });
  const p = new ForecastPolicy({ layers: header.layers, experts: header.experts, capacity: 2 * header.topK }, { routingPredictor: false });
  const min = 0.3;
  const logit = (x: number) => Math.log(x / (1 - x));
  const bound = (p as unknown as { nextVisitBound(l: number, e: number, at: number): number }).nextVisitBound.bind(p);
  let visits = 0;
  let same = 0;
  let hinted = 0;
  let checked = 0;
  let below = 0; // forecasts whose bound is not above them
  let skipped = 0;
  for (let step = 0; step < sched.numSteps; step++) {
    for (let l = 0; l < header.layers; l++) {
      p.observe(step, l, sched.steps[step]);
      const need = sched.set(l, step);
      if (need.length === 0) continue;
      p.request(l, need);
      const at = (p as unknown as { visits: Int32Array }).visits[l] - 1;
      // The bounds as of the visit, before any forecast of it is cached.
      const bounds = new Map<number, number>();
      for (let e = 0; e < header.experts; e++) if (p.slotOf(l, e) < 0) bounds.set(e, bound(l, e, at));
      const pruned = p.nextVisitHints(l, min);
      const full = p.nextVisitHints(l, 1e-300); // no bound can skip at this threshold
      const want = full.filter((h) => h.priority >= min);
      visits++;
      if (JSON.stringify(pruned) === JSON.stringify(want)) same++;
      if (pruned.length > 0) hinted++;
      for (const h of full) {
        const b = bounds.get(h.expert)!;
        checked++;
        if (h.priority > 1e-12 && h.priority < 1 - 1e-12 && b < logit(h.priority) - 1e-9) below++;
        if (b < logit(min) - 1e-9) skipped++;
      }
    }
  }
  t.equal(same, visits, `every visit's hints are the full forecast's (${visits} visits)`);
  t.ok(hinted > visits / 10, `hints were made (${hinted} visits)`);
  t.equal(below, 0, `the bound is above every forecast (${checked} checked)`);
  t.ok(skipped > checked / 2, `most non-resident experts are skipped by the bound (${skipped} of ${checked})`);
});

t.test('forecast prior: the default starts from FORECAST_PRIOR, null from zero, a prior of another shape is refused', async (t) => {
  const shape = { layers: 2, experts: 16, capacity: 4 };
  const dflt = new ForecastPolicy(shape).model();
  t.same(dflt.w, FORECAST_PRIOR.w, 'weights of the prior');
  t.same(dflt.g2, FORECAST_PRIOR.g2, 'Adagrad sums of the prior');
  t.ok(FORECAST_PRIOR.w.some((x) => x !== 0), 'a fitted prior, not zeros');
  const zero = new ForecastPolicy(shape, { prior: null }).model();
  t.ok(zero.w.every((x) => x === 0), 'prior: null starts from zero');
  const bad: ForecastModel = { ...FORECAST_PRIOR, features: FORECAST_PRIOR.features + 1 };
  t.throws(() => new ForecastPolicy(shape, { prior: bad }), /forecast prior: made for 4 horizons x 28 features, the model has 4 x 27 \(fit it again/);
  t.throws(() => new ForecastPolicy(shape, { prior: { ...FORECAST_PRIOR, w: FORECAST_PRIOR.w.map((x, i) => (i === 3 ? NaN : x)) } }), /finite/);
});

t.test('forecast prior: fitted on one real trace, it lowers the loads on the other (out of sample)', async (t) => {
  const [qwen, gemma] = TRACES;
  const name = (f: string) => f.split('/').pop();
  for (const [fitOn, evalOn] of [
    [gemma, qwen],
    [qwen, gemma],
  ]) {
    const runs: number[] = [];
    const prior = await fitForecastPrior([fitOn], { epochs: 1, onRun: (_f, _e, loads) => runs.push(loads) });
    t.equal(runs.length, 1);
    t.equal(prior.w.length, 4 * prior.features);
    t.ok([...prior.w, ...prior.g2].every(Number.isFinite));
    const { header, requests } = await loadTrace(evalOn);
    const sched = await buildSchedule(header, requests, { concurrency: 1 });
    for (const m of [2, 4]) {
      const shape = { layers: header.layers, experts: header.experts, capacity: m * header.topK };
      const loads = (p: ForecastModel | null) => simulate(sched, new ForecastPolicy(shape, { prior: p })).loads;
      const cold = loads(null);
      const warm = loads(prior);
      // The prior's Adagrad sums with zero weights: what is left when the weights are lost.
      const sums = loads({ ...prior, w: prior.w.map(() => 0) });
      t.comment(`${name(evalOn)} at ${m}x: ${cold} loads from zero, ${warm} from a prior fitted on ${name(fitOn)}, ${sums} from its Adagrad sums alone`);
      // Measured: qwen3 2x -0.14%, 4x -1.47%; gemma4 2x -0.40%, 4x -1.19% (the sums alone:
      // +0.10%, -0.40%, +0.84%, -0.15%).
      t.ok(warm < cold, `${name(evalOn)} ${m}x: the prior from ${name(fitOn)} lowers the loads`);
      t.ok(warm < sums, `${name(evalOn)} ${m}x: its weights carry it`);
    }
  }
});

t.test('forecast prior: the module the fit writes holds the model', async (t) => {
  const dir = tempDir(t);
  const trace = join(dir, 'small.csv');
  writeFileSync(trace, syntheticTrace(6));
  const model = await fitForecastPrior([trace], { epochs: 2 });
  t.ok(model.w.some((x) => x !== 0), 'it learned');
  const again = await fitForecastPrior([trace], { epochs: 1, start: model });
  t.not(again.w.join(), model.w.join(), 'a fit from a start goes on learning');
  const file = join(dir, 'prior.ts');
  writeFileSync(file, priorModule(model, ['test']).replace("from './forecast.js'", "from '" + join(import.meta.dirname, '..', 'src', 'offload', 'forecast.js') + "'"));
  const m = (await import(file)) as { FORECAST_PRIOR: ForecastModel };
  t.same(m.FORECAST_PRIOR, model, 'the same numbers, exactly');
  await t.rejects(fitForecastPrior([], {}), /no trace/);
  await t.rejects(fitForecastPrior([trace], { epochs: 0 }), /epochs must be an integer >= 1/);
});
