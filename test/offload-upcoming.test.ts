// Schedule-aware eviction (src/offload/upcoming.ts): the scheduler names the sequences
// of the next steps, their recent routing weighs the experts they are expected to need,
// and the expert cache evicts those last (LRU, LFU) or adds the weight to its forecast
// (forecast). Covered: the weights, the eviction rule, the scheduler's list, the batching
// simulator, and the offload runner (results bitwise unchanged, planned experts kept).

import t from 'tap';
import { NativeRunner } from '../src/engine/native-runner.js';
import type { StepSequence } from '../src/engine/runner.js';
import { argmax } from '../src/engine/sampling.js';
import { openModel } from '../src/model/checkpoint.js';
import { Rng } from '../src/model/prng.js';
import { runBatchSim, type BatchSimOptions } from '../src/offload/batch-sim.js';
import { ForecastPolicy } from '../src/offload/forecast.js';
import { LfuPolicy } from '../src/offload/lfu.js';
import { LruPolicy } from '../src/offload/lru.js';
import { OffloadRunner } from '../src/offload/offload-runner.js';
import { makeRng } from '../src/offload/synth-trace.js';
import type { TraceHeader } from '../src/offload/trace.js';
import { upcomingWeights } from '../src/offload/upcoming.js';
import { FcfsPolicy } from '../src/scheduler/fcfs-policy.js';
import { Scheduler } from '../src/scheduler/scheduler.js';
import { FakeOffloadStore } from './helpers/fake-offload-store.js';
import { writeModel } from './helpers/models.js';
import { topicTrace } from './helpers/topic-trace.js';

t.test('upcomingWeights: hint weight x 2^-step, the first planSteps steps only', async (t) => {
  const L = 2;
  const E = 4;
  const hints = new Map([
    [1, { experts: [[0, 1], [2]], weights: [[1, 0.5], [0.25]] }],
    [2, { experts: [[1], [3, 9, -1]] }], // out-of-range ids are ignored; no weights: 1 each
    [3, { experts: [[2], [2]] }],
  ]);
  const out = new Float64Array(L * E).fill(7);
  t.ok(upcomingWeights(out, L, E, [[1, 5], [2], [3]], (s) => hints.get(s), 2));
  // Step 0: sequence 1 (5 has no hint); step 1 (x 0.5): sequence 2; step 2 is beyond planSteps.
  t.same(Array.from(out), [1, 0.5 + 0.5, 0, 0, 0, 0, 0.25, 0.5]);
  t.notOk(upcomingWeights(out, L, E, [[5]], (s) => hints.get(s), 4), 'no hint: nothing weighted');
  t.same(Array.from(out), new Array(L * E).fill(0));
  t.notOk(upcomingWeights(out, L, E, [[1]], (s) => hints.get(s), 0), 'planSteps 0: off');
});

t.test('LRU and LFU evict upcoming experts last, the lowest weight first; prefetches never displace them', async (t) => {
  for (const make of [() => new LruPolicy({ layers: 1, experts: 8, capacity: 3 }), () => new LfuPolicy({ layers: 1, experts: 8, capacity: 3 })]) {
    const c = make();
    for (const e of [0, 1, 2]) c.request(0, [e]); // 0 is the least recently (and, tied, least often) used
    t.same(c.request(0, [3]).evictions.map((x) => x.expert), [0], `${c.name}: without weights its own rank`);
    const w = new Float64Array(8);
    w[1] = 0.5;
    w[2] = 1;
    c.setUpcoming(w);
    // Residents 1, 2, 3: 3 is unweighted, so it goes although it was used last.
    t.same(c.request(0, [4]).evictions.map((x) => x.expert), [3], `${c.name}: the unweighted resident first`);
    // Residents 1 (0.5), 2 (1), 4 (0): 4 goes; then 1, the lower weight.
    t.same(c.request(0, [5]).evictions.map((x) => x.expert), [4]);
    t.same(c.request(0, [6]).evictions.map((x) => x.expert), [5]);
    // Residents 1 (0.5), 2 (1), 6 (2): every one weighted.
    w[6] = 2;
    t.same(c.prefetch(0, [{ expert: 7, priority: 1 }], 1), [], `${c.name}: no prefetch displaces a weighted resident`);
    t.same(c.request(0, [7]).evictions.map((x) => x.expert), [1], `${c.name}: a demand load takes the lowest weight`);
    c.setUpcoming(null);
    t.same(c.request(0, [0]).evictions.map((x) => x.expert), [2], `${c.name}: null: its own rank again`);
    t.throws(() => c.setUpcoming(new Float64Array(3)), /3 values for 1 layers x 8 experts/);
  }
});

t.test('forecast adds the upcoming weight to its score: a large weight keeps an expert it would evict', async (t) => {
  const run = (weightOn: number | null) => {
    const c = new ForecastPolicy({ layers: 1, experts: 16, capacity: 4 }, { prefetch: false });
    const rng = makeRng(3);
    let victim = -1;
    for (let v = 0; v < 60; v++) {
      const need = [Math.floor(rng() * 16), Math.floor(rng() * 16)].filter((e, i, a) => a.indexOf(e) === i);
      if (v === 59 && weightOn !== null) {
        const w = new Float64Array(16);
        w[weightOn] = 1000;
        c.setUpcoming(w);
      }
      const d = c.request(0, need);
      if (v === 59) victim = d.evictions.length ? d.evictions[0].expert : -1;
    }
    return victim;
  };
  // Find a last visit that evicts; then weigh that victim heavily: another one goes.
  const plain = run(null);
  t.ok(plain >= 0, `the last visit evicts (${plain})`);
  const again = run(plain);
  t.ok(again >= 0 && again !== plain, `with a weight on ${plain} the victim is ${again}`);
});

t.test('the scheduler lists the running sequences that sat out the step, longest-waiting first, a step each maxBatchTokens', async (t) => {
  const s = new Scheduler({ blockSize: 4, numBlocks: 64, maxBatchTokens: 2, maxRunning: 8, maxWaiting: 8, policy: new FcfsPolicy(), prefillFirst: true });
  for (let i = 0; i < 5; i++) s.addRequest({ requestId: `r${i}`, promptTokens: [1], maxTokens: 50 });
  const seqOf = new Map<number, string>();
  const step = () => {
    const out = s.schedule();
    for (const e of out.entries) seqOf.set(e.seqId, e.requestId);
    s.updateFromOutput(out, new Map(out.entries.map((e) => [e.requestId, 5])));
    return out;
  };
  // Admission (prompt-only steps): r0 r1, r2 r3, r4.
  step();
  t.same(step().upcoming.map((g) => g.map((q) => seqOf.get(q))), [['r0', 'r1']], 'r0, r1 waited; r2, r3 ran');
  step();
  // Decode round robin: 5 running, 2 per step.
  const out = step();
  const ran = out.entries.map((e) => e.requestId);
  const next = out.upcoming.map((g) => g.map((q) => seqOf.get(q)));
  t.equal(ran.length, 2);
  t.same(next.flat().sort(), ['r0', 'r1', 'r2', 'r3', 'r4'].filter((r) => !ran.includes(r)).sort(), 'every other running sequence, once');
  t.same(next.map((g) => g.length), [2, 1]);
  const following = step().entries.map((e) => e.requestId);
  t.same(following, next[0], 'the next step runs what upcoming[0] named (FCFS)');
  // Everything fits: nothing upcoming.
  const s2 = new Scheduler({ blockSize: 4, numBlocks: 64, maxBatchTokens: 8, maxRunning: 8, maxWaiting: 8, policy: new FcfsPolicy() });
  s2.addRequest({ requestId: 'a', promptTokens: [1, 2], maxTokens: 4 });
  t.same(s2.schedule().upcoming, []);
});

const L = 4;
const E = 32;
const K = 2;
const header: TraceHeader = { model: 'toy', layers: L, experts: E, topK: K, source: 'test' };

t.test('batching simulator: with the plan, LRU loads less for FCFS and expert-aware; the schedule is the same', async (t) => {
  const src = { header, requests: topicTrace(80, 24, { layers: L, topK: K, keep: 0.5, seed: 2 }) };
  const base: Omit<BatchSimOptions, 'scheduler'> = { batch: 4, concurrency: 16, capacity: 12, policy: { maxExtraWaitSteps: 1 } };
  for (const scheduler of ['fcfs', 'expert-aware'] as const) {
    const off = await runBatchSim(src, { ...base, scheduler, planSteps: 0 });
    const on = await runBatchSim(src, { ...base, scheduler, planSteps: 4 });
    t.equal(on.planSteps, 4);
    t.equal(on.tokens, off.tokens, `${scheduler}: every token runs`);
    if (scheduler === 'fcfs') {
      // FCFS does not look at the cache: the same steps, only the evictions differ.
      t.equal(on.distinctPerStep, off.distinctPerStep);
      t.same(Array.from(on.waits), Array.from(off.waits));
    }
    t.ok(on.loadsPerToken < off.loadsPerToken * 0.95, `${scheduler}: loads/token ${on.loadsPerToken.toFixed(3)} with the plan < 0.95 x ${off.loadsPerToken.toFixed(3)} without`);
  }
});

t.test('offload runner: planUpcoming keeps the planned sequences experts; logits stay bitwise those of the resident runner', async (t) => {
  const dir = writeModel(t, { arch: 'qwen3_moe', seed: 5, overrides: { numLayers: 4 } });
  const m = await openModel(dir);
  t.teardown(() => m.close());
  const spec = m.spec;
  const nSeq = 6;
  const perStep = 2;
  const BLOCK = 16;
  const kv = { blockSize: BLOCK, numBlocks: nSeq * 4 };
  const ref = NativeRunner.fromCheckpoint(spec, m.weights, { weights: 'f32', threads: 2, kvBlockSize: BLOCK, kvBlocks: kv.numBlocks });
  t.teardown(() => ref.close());
  const slots = spec.topK * 2;
  const make = (planSteps: number) => {
    const inner = NativeRunner.fromCheckpoint(spec, m.weights, { weights: 'f32', threads: 2, kvBlockSize: BLOCK, kvBlocks: kv.numBlocks }).engine;
    const store = new FakeOffloadStore(inner, { layers: spec.numLayers, experts: spec.numExperts }, slots, {});
    const r = new OffloadRunner(spec, kv, store, slots, { policy: 'lru', lookahead: 0, planSteps });
    t.teardown(() => r.close());
    return r;
  };
  const planned = make(4);
  const plain = make(0);
  const rng = new Rng(9);
  const V = spec.vocabSize;
  const seqs = Array.from({ length: nSeq }, (_, i) => ({ id: i, last: rng.u32() % m.tokenizer.vocabSize, pos: 0, blocks: Int32Array.from({ length: 4 }, (_, j) => i * 4 + j) }));
  let keptPlanned = 0;
  let keptPlain = 0;
  let bad = 0;
  const groups = Array.from({ length: nSeq / perStep }, (_, g) => seqs.slice(g * perStep, (g + 1) * perStep));
  for (let step = 0; step < 30; step++) {
    const g = groups[step % groups.length];
    // The next steps in round-robin order, as the scheduler names them.
    const upcoming = [1, 2].map((d) => groups[(step + d) % groups.length].map((s) => s.id));
    planned.planUpcoming(upcoming);
    plain.planUpcoming(upcoming); // off: ignored
    const batch: StepSequence[] = g.map((s) => ({ seqId: s.id, tokens: Uint32Array.of(s.last), startPos: s.pos, blockTable: s.blocks, wantLogits: true }));
    const a = ref.step(batch);
    const b = planned.step(batch);
    const c = plain.step(batch);
    if (!Buffer.from(a.logits.buffer, a.logits.byteOffset, a.logits.byteLength).equals(Buffer.from(b.logits.buffer, b.logits.byteOffset, b.logits.byteLength))) bad++;
    if (!Buffer.from(a.logits.buffer, a.logits.byteOffset, a.logits.byteLength).equals(Buffer.from(c.logits.buffer, c.logits.byteOffset, c.logits.byteLength))) bad++;
    g.forEach((s, i) => {
      s.last = argmax(a.logits.subarray(i * V, (i + 1) * V), 0, m.tokenizer.vocabSize);
      s.pos++;
    });
    // After warm-up: how many of the next step's sequences' last experts are still resident.
    if (step >= groups.length) {
      const count = (r: OffloadRunner) => {
        const res = r.residentExperts();
        let n = 0;
        for (const id of upcoming[0]) {
          const h = r.routingHints(id)!;
          for (let l = 0; l < spec.numLayers; l++) for (let k = 0; k < h.experts[l].length; k++) if ((h.weights?.[l][k] ?? 1) >= 1 && res[l][h.experts[l][k]]) n++;
        }
        return n;
      };
      keptPlanned += count(planned);
      keptPlain += count(plain);
    }
  }
  t.equal(bad, 0, 'every step bitwise equal to the resident runner, with and without the plan');
  t.same(planned.audit(), [], 'policy slots and store agree');
  t.ok(keptPlanned > keptPlain, `the next step's experts resident before it runs: ${keptPlanned} with the plan, ${keptPlain} without`);
  const misses = (r: OffloadRunner) => r.offloadStats().layers.reduce((a, l) => a + l.misses, 0);
  t.ok(misses(planned) < misses(plain), `misses ${misses(planned)} with the plan < ${misses(plain)} without`);
});
