// The offload runner: capacity settings, online policies, routing replay and pre-gating
// counters, and above all that offloading never changes the arithmetic: logits of
// prefill and decode steps of a batch are bitwise those of the all-resident NativeRunner
// at a small capacity (steps split, evictions, prefetches, cancellations).
//
// Two stores: a TypeScript double of the native expert store over a resident engine
// (always runs), and the addon's own store (runs when this build of the addon has it).

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { openModel } from '../src/model/checkpoint.js';
import { NativeRunner, packBatch } from '../src/engine/native-runner.js';
import type { ModelRunner, RoutingEvent, StepSequence } from '../src/engine/runner.js';
import { argmax } from '../src/engine/sampling.js';
import { Rng } from '../src/model/prng.js';
import type { Architecture } from '../src/model/spec.js';
import { CapacityError, expertSlotBytes, parseCapacity, parseSplit, slotsByLayer, slotsPerLayer, splitSlots } from '../src/offload/capacity.js';
import { OffloadRunner } from '../src/offload/offload-runner.js';
import { createOnlinePolicy } from '../src/offload/policies.js';
import { measurePregating, NeedCalibration, PredictionCounters, scoreTopK, topKIds } from '../src/offload/prediction.js';
import { replayedRequests, RoutingReplay } from '../src/offload/replay.js';
import { loadTrace, NO_EXPERT } from '../src/offload/trace.js';
import { FakeOffloadStore } from './helpers/fake-offload-store.js';
import { tempDir, writeModel } from './helpers/models.js';
import { NO_OFFLOAD_SKIP } from './helpers/offload.js';

const BLOCK = 16;
const BLOCKS_PER_SEQ = 8;

async function model(t: Parameters<typeof writeModel>[0], arch: Architecture, layers: number) {
  const dir = writeModel(t, { arch, seed: 5, overrides: { numLayers: layers } });
  const m = await openModel(dir);
  t.teardown(() => m.close());
  return { dir, m, spec: m.spec, vocabLimit: m.tokenizer.vocabSize };
}

type Opened = Awaited<ReturnType<typeof model>>;

function resident(x: Opened, seqs: number, extra: Partial<Parameters<typeof NativeRunner.fromCheckpoint>[2]> = {}): NativeRunner {
  return NativeRunner.fromCheckpoint(x.spec, x.m.weights, { weights: 'f32', threads: 2, kvBlockSize: BLOCK, kvBlocks: seqs * BLOCKS_PER_SEQ, ...extra });
}

/** An offload runner over the TypeScript store double; `slots`: one count for every layer, or one per layer. */
function faked(x: Opened, seqs: number, slots: number | readonly number[], o: ConstructorParameters<typeof OffloadRunner>[4] = {}, readsPerLayer = 1, noisyPrediction = false) {
  const inner = resident(x, seqs).engine;
  const store = new FakeOffloadStore(inner, { layers: x.spec.numLayers, experts: x.spec.numExperts }, slots, { readsPerLayer, noisyPrediction });
  const runner = new OffloadRunner(x.spec, { blockSize: BLOCK, numBlocks: seqs * BLOCKS_PER_SEQ }, store, slots, o);
  return { runner, store };
}

function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

/**
 * Drives both runners through the same steps: prompts of several lengths (one of them
 * prefilled in two chunks, the first without logits) then `decode` greedy steps of the
 * whole batch, the resident runner choosing the tokens. Returns the steps whose logits
 * were not bitwise equal.
 */
function compare(a: ModelRunner, b: ModelRunner, vocabLimit: number, nSeq: number, decode: number, seed = 1): number[] {
  const rng = new Rng(seed);
  const V = a.spec.vocabSize;
  const seqs = Array.from({ length: nSeq }, (_, i) => ({
    id: i,
    tokens: Array.from({ length: 3 + ((i * 7) % 19) }, () => rng.u32() % vocabLimit),
    done: 0,
    blocks: Int32Array.from({ length: BLOCKS_PER_SEQ }, (_, j) => i * BLOCKS_PER_SEQ + j),
  }));
  const bad: number[] = [];
  for (let step = 0; step <= decode + 1; step++) {
    const batch: StepSequence[] = [];
    for (const s of seqs) {
      // Sequence 0's prompt arrives in two chunks.
      const end = s.id === 0 && step === 0 ? Math.max(1, s.tokens.length - 2) : s.tokens.length;
      if (end <= s.done) continue;
      batch.push({ seqId: s.id, tokens: Uint32Array.from(s.tokens.slice(s.done, end)), startPos: s.done, blockTable: s.blocks, wantLogits: end === s.tokens.length });
    }
    const ra = a.step(batch);
    const rb = b.step(batch);
    if (ra.rows !== rb.rows || !sameBits(ra.logits, rb.logits)) bad.push(step);
    let row = 0;
    for (const x of batch) {
      const s = seqs[x.seqId];
      s.done = x.startPos + x.tokens.length;
      if (x.wantLogits) s.tokens.push(argmax(ra.logits.subarray(row * V, (row + 1) * V), 0, vocabLimit));
      if (x.wantLogits) row++;
    }
  }
  return bad;
}

t.test('capacity: fractions and byte budgets become slots per layer', async (t) => {
  t.same(parseCapacity('0.25'), { kind: 'fraction', fraction: 0.25 });
  t.same(parseCapacity('25%'), { kind: 'fraction', fraction: 0.25 });
  t.same(parseCapacity('1'), { kind: 'fraction', fraction: 1 });
  t.same(parseCapacity('12GiB'), { kind: 'bytes', bytes: 12 * 2 ** 30 });
  t.same(parseCapacity('512 MiB'), { kind: 'bytes', bytes: 512 * 2 ** 20 });
  t.same(parseCapacity('1.5GB'), { kind: 'bytes', bytes: 1.5e9 });
  t.same(parseCapacity('4096B'), { kind: 'bytes', bytes: 4096 });
  for (const bad of ['', 'abc', '0', '2', '1.5', '-0.5', '150%', '12XB', '0B']) t.throws(() => parseCapacity(bad), CapacityError, `rejects ${JSON.stringify(bad)}`);
  t.throws(() => parseCapacity('2'), /fraction and must be in \(0, 1\]/);
  t.throws(() => parseCapacity('12XB'), /unknown unit "XB"/);

  const shape = { layers: 48, experts: 128, slotBytes: 5 << 20 };
  t.equal(slotsPerLayer('0.25', shape), 32);
  t.equal(slotsPerLayer('100%', shape), 128);
  // 48 layers × 32 slots × 5 MiB = 7.5 GiB; a byte above or below.
  t.equal(slotsPerLayer(String(48 * 32 * (5 << 20)) + 'B', shape), 32);
  t.equal(slotsPerLayer(String(48 * 32 * (5 << 20) - 1) + 'B', shape), 31);
  t.equal(slotsPerLayer('1TiB', shape), 128, 'clamped to the experts');
  t.equal(slotsPerLayer('0.05', shape), 6, 'fewer slots than top-k are allowed (visits stream)');
  t.throws(() => slotsPerLayer('0.005', shape), /0.005 of 128 experts per layer gives no expert slot per layer; at least one slot per layer is needed \(fraction 0.00781, or 251658240 bytes\)/);
  t.throws(() => slotsPerLayer('100MiB', shape), /gives no expert slot per layer/);
  const s = expertSlotBytes('q8_0', 2048, 768);
  t.equal(s.expertBytes, 3 * 2048 * 768 * 34 / 32);
  t.equal(s.slotBytes % 4096, 0);
  t.ok(s.slotBytes >= s.expertBytes && s.slotBytes - s.expertBytes < 4096);
});

t.test('split: the slot budget divided across layers by weight', async (t) => {
  // Equal is the old behaviour exactly, for fractions and byte budgets alike.
  const shape = { layers: 48, experts: 128, slotBytes: 5 << 20 };
  for (const cap of ['0.25', '100%', '0.05', '1TiB', String(48 * 32 * (5 << 20) - 1) + 'B', '3GiB']) {
    t.same(slotsByLayer(cap, 'equal', shape), new Array(48).fill(slotsPerLayer(cap, shape)), `equal ${cap}`);
    t.same(slotsByLayer(cap, '', shape), slotsByLayer(cap, 'equal', shape), 'empty means equal');
  }
  t.throws(() => slotsByLayer('0.005', 'equal', shape), /gives no expert slot per layer/);

  // Proportional shares, rounded by largest remainder (sum exact).
  t.same(splitSlots(32, [2, 2, 1, 1, 1, 1, 1, 1], 16), [7, 7, 3, 3, 3, 3, 3, 3], '6.4, 6.4, 3.2 x 6: the two .4 remainders win');
  t.same(splitSlots(10, [3, 2, 1], 8), [5, 3, 2], '5, 3.33, 1.67: the largest remainder (.67) takes the leftover slot');
  t.same(splitSlots(4, [1, 1, 1], 8), [2, 1, 1], 'equal remainders: the lower layer first');
  t.same(splitSlots(12, [1, 1, 1, 1], 8), [3, 3, 3, 3], 'equal weights divide evenly');
  t.same(splitSlots(7, [0.5, 1.5], 8), [2, 5], 'fractional weights: 1.75, 5.25');
  // Clamping: at most `experts`, the excess shared by the others in proportion to their weights.
  t.same(splitSlots(20, [100, 1, 1], 8), [8, 6, 6], 'layer 0 capped at 8; 12 left for two equal weights');
  t.same(splitSlots(21, [100, 2, 1], 8), [8, 8, 5], 'capped twice: 13 over 2:1 is 8.67 > 8, so layer 1 caps too');
  // ... and at least 1, taken from the others the same way.
  t.same(splitSlots(12, [5, 1, 1, 1, 1, 1, 1, 1, 1, 1], 4), [3, 1, 1, 1, 1, 1, 1, 1, 1, 1], 'the small layers keep 1 each; layer 0 gets the 3 left, under its cap');
  t.same(splitSlots(8, [1, 0, 0, 3], 8), [2, 1, 1, 4], 'a zero weight gets one slot; 6 over 1:3 is 1.5, 4.5');
  t.same(splitSlots(3, [100, 1, 1], 8), [1, 1, 1], 'a budget of one slot per layer');
  t.same(splitSlots(40, [1, 0, 0], 8), [8, 1, 1], 'a budget beyond what the weights can take is capped');
  t.same(splitSlots(24, [1, 2, 3], 8), [8, 8, 8], 'a budget of every expert');
  // Properties over many random cases: the sum, the bounds, and floor/ceil of the exact share.
  const rng = new Rng(3);
  let ok = true;
  for (let i = 0; i < 3000 && ok; i++) {
    const L = 1 + (rng.u32() % 9);
    const E = 1 + (rng.u32() % 12);
    const w = Array.from({ length: L }, () => (rng.u32() % 4 === 0 ? 0 : rng.u32() % 7));
    if (!w.some((x) => x > 0)) w[0] = 1;
    const total = L + (rng.u32() % (L * E));
    const out = splitSlots(total, w, E);
    const cap = Math.min(total, w.reduce((a, x) => a + (x > 0 ? E : 1), 0));
    // The exact shares clamp(λw, 1, E) summing to cap, by bisection on λ.
    const f = (lam: number) => w.reduce((a, x) => a + (x === 0 ? 1 : Math.min(E, Math.max(1, lam * x))), 0);
    let lo = 0;
    let hi = 1e6;
    for (let k = 0; k < 200; k++) {
      const m = (lo + hi) / 2;
      if (f(m) < cap) lo = m;
      else hi = m;
    }
    const q = w.map((x) => (x === 0 ? 1 : Math.min(E, Math.max(1, hi * x))));
    ok = out.reduce((a, b) => a + b, 0) === cap && out.every((v, l) => v >= 1 && v <= E && v >= Math.floor(q[l] + 1e-7) && v <= Math.ceil(q[l] - 1e-7));
    if (!ok) t.fail(`splitSlots(${total}, [${w}], ${E}) = [${out}], exact shares [${q.map((x) => x.toFixed(3))}]`);
  }
  t.ok(ok, '3000 random splits: exact sum, bounds, each layer the floor or ceiling of its share');

  // The budget: floor(fraction x experts) x layers, or floor(bytes / slot bytes).
  const small = { layers: 4, experts: 16, slotBytes: 1 << 20 };
  t.same(slotsByLayer('0.25', '2,1,1,0', small), [7, 4, 4, 1], 'fraction: 4 x 4 = 16 slots; zero weight 1, 15 over 2:1:1');
  t.same(slotsByLayer('0.25', '1,1,1,1', small), [4, 4, 4, 4], 'equal weights at a fraction: as equal');
  t.same(slotsByLayer('18MiB', '1,1,1,1', small), [5, 5, 4, 4], 'bytes: 18 slots over 4 layers (equal gives 4 each)');
  t.same(slotsByLayer('18MiB', 'equal', small), [4, 4, 4, 4]);
  t.same(slotsByLayer('1TiB', '1,1,1,0', small), [16, 16, 16, 1], 'capped at the experts');
  t.same(slotsByLayer(parseCapacity('0.5'), parseSplit('3,1,0,0'), small), [16, 14, 1, 1], '32 slots: 30 over 3:1 is 22.5 for layer 0, capped at 16; the excess to layer 1');

  // Errors: the split's form when parsed, its length against the model.
  t.same(parseSplit('equal'), { kind: 'equal' });
  t.same(parseSplit(' 2, 2 ,1 '), { kind: 'weights', weights: [2, 2, 1], text: '2,2,1' });
  for (const [bad, why] of [
    ['2,-1', /weight 2 \("-1"\) is negative/],
    ['2,x,1', /weight 2 \("x"\) is not a number/],
    ['1,,2', /weight 2 \(""\) is not a number/],
    ['1e3', /weight 1 \("1e3"\) is not a number/],
    ['0,0,0', /every weight is 0/],
    ['Infinity', /is not a number/],
  ] as const) {
    t.throws(() => parseSplit(bad), CapacityError, `rejects ${bad}`);
    t.throws(() => parseSplit(bad), why);
    t.throws(() => parseSplit(bad), /give equal, or one non-negative weight per layer/);
  }
  t.throws(() => parseSplit('1,2', 3), /expert cache split "1,2": 2 weights, but the model has 3 layers \(one weight per layer is needed\)/);
  t.throws(() => slotsByLayer('0.25', '1,2,3', small), /expert cache split "1,2,3": 3 weights, but the model has 4 layers \(one weight per layer is needed\); give equal, or 4 non-negative weights, one per layer, comma-separated \(e\.g\. 2,2,1,1\)$/);
  t.throws(() => slotsByLayer('0.05', '1,1,1,1', small), /0.05 of 16 experts per layer gives 0 expert slots for 4 layers; at least one slot per layer is needed/);
  t.throws(() => slotsByLayer('3MiB', '1,1,1,1', small), /3145728 bytes of 1048576-byte expert slots gives 3 expert slots for 4 layers/);
  t.throws(() => splitSlots(2, [1, 1, 1], 8), /2 expert slots for 3 layers; every layer needs at least one slot/);
  t.throws(() => splitSlots(5, [0, 0], 8), /every weight is 0/);
  t.throws(() => splitSlots(5, [1, -1], 8), /non-negative/);
});

t.test('online policies: every simulator policy but Belady', async (t) => {
  const shape = { layers: 2, experts: 8, topK: 2, capacity: 4 };
  for (const name of ['lru', 'lfu', 'lfu-decay', 'predictive']) t.equal(createOnlinePolicy(name, shape).name, name);
  t.throws(() => createOnlinePolicy('belady', shape), /needs the future/);
  t.throws(() => createOnlinePolicy('fifo', shape), /unknown expert cache policy "fifo"; policies: lru, lfu, lfu-decay, predictive/);
});

t.test('prediction counters: top-k and per-token overlap', async (t) => {
  const logits = Float32Array.from([0.1, 0.9, 0.5, 0.9, /* token 1 */ 3, 2, 1, 0]);
  t.same(Array.from(topKIds(logits, 2, 4, 2)), [1, 3, 0, 1], 'best first, lower id first on ties');
  const s = scoreTopK(Int32Array.from([1, 3, 0, 1]), 2, Int32Array.from([3, 2, 0, 1]), 2, 2);
  t.same(s, { predicted: 4, actual: 4, hits: 3 });
  const c = new PredictionCounters(2);
  c.add(1, Int32Array.from([1, 3]), 2, Int32Array.from([3, 2]), 2, 1);
  c.add(2, Int32Array.from([0, 1, 2]), 3, Int32Array.from([0, 5]), 2, 1);
  t.same(
    c.snapshot().map((x) => [x.distance, x.hits, x.recall, x.precision]),
    [
      [1, 1, 0.5, 0.5],
      [2, 1, 0.5, 1 / 3],
    ],
  );
});

for (const arch of ['qwen3_moe', 'mixtral'] as const) {
  for (const policy of ['lru', 'predictive', 'forecast']) {
    for (const lookahead of [0, 2]) {
      // Just above top-k (nearly every visit streams its experts through the slots), and
      // three quarters of the experts (only prompt steps stream).
      for (const size of ['small', 'large'] as const) {
        t.test(`${arch}, ${policy}, lookahead ${lookahead}, ${size} cache: logits bitwise equal to the resident runner (store double)`, async (t) => {
          const x = await model(t, arch, 4);
          const nSeq = 5;
          const ref = resident(x, nSeq);
          t.teardown(() => ref.close());
          const slots = size === 'small' ? x.spec.topK + 2 : Math.floor(x.spec.numExperts * 0.75);
          // Pre-gating at every step (pregatingMinLift 0), however well the double predicts.
          const { runner, store } = faked(x, nSeq, slots, { policy, lookahead, pregatingMinLift: 0 });
          t.teardown(() => runner.close());
          const bad = compare(ref, runner, x.vocabLimit, nSeq, 12);
          t.same(bad, [], 'every step bitwise equal');
          t.same(runner.audit(), [], 'policy slots and store agree');
          const st = runner.offloadStats();
          const sum = (f: (l: (typeof st.layers)[number]) => number) => st.layers.reduce((a, l) => a + f(l), 0);
          t.ok(sum((l) => l.misses) > 0 && sum((l) => l.hits) > 0, `hits ${sum((l) => l.hits)}, misses ${sum((l) => l.misses)}`);
          t.ok(sum((l) => l.streamedVisits) > 0, `${sum((l) => l.streamedVisits)} visits streamed through the slots`);
        t.equal(store.parts > 0, true, 'with expertsPart');
          t.ok(st.loads > 0, 'the store completed loads');
          for (let l = 0; l < x.spec.numLayers; l++) t.ok(store.held(l) <= slots);
          if (lookahead === 0) {
            t.equal(sum((l) => l.prefetchIssued), 0, 'no prefetch');
            t.equal(store.calls.predictRouter, 0);
            t.same(st.prediction, []);
          } else {
            const issued = sum((l) => l.prefetchIssued);
            t.ok(issued > 0, `${issued} prefetches issued`);
            t.ok(store.calls.predictRouter > 0);
            // Each prefetch is used, wasted, cancelled, or still waiting for its use.
            const state = runner.expertCacheState();
            const pending = state.layers.reduce((a, l) => a + l.prefetched.length, 0);
            t.equal(sum((l) => l.prefetchUsed) + sum((l) => l.prefetchWasted) + sum((l) => l.prefetchCancelled) + pending, issued, 'issued = used + wasted + cancelled + pending');
            t.equal(st.prediction.length, 2, 'recall and precision for distances 1 and 2');
            for (const p of st.prediction) {
              t.ok(p.actual > 0 && p.recall >= 0 && p.recall <= 1 && p.precision >= 0 && p.precision <= 1);
              // The double predicts layer l+d with layer l's router: right often enough to be above chance.
              t.ok(p.recall > x.spec.topK / x.spec.numExperts, `distance ${p.distance}: recall ${p.recall.toFixed(3)} above chance`);
            }
          }
        });
      }
    }
  }
}

t.test('a visit waiting for reads runs its resident experts first; still bitwise equal (store double)', async (t) => {
  const x = await model(t, 'qwen3_moe', 4);
  const ref = resident(x, 1);
  t.teardown(() => ref.close());
  const slots = Math.floor(x.spec.numExperts * 0.75);
  for (const residentFirst of [true, false]) {
    // No read completes before its visit: every visit with a miss waits.
    const { runner, store } = faked(x, 1, slots, { policy: 'lru', lookahead: 0, residentFirst }, 0);
    t.same(compare(ref, runner, x.vocabLimit, 1, 16), [], `residentFirst ${residentFirst}: every step bitwise equal`);
    const st = runner.offloadStats();
    t.equal(st.layers.reduce((a, l) => a + l.streamedVisits, 0), 0, 'nothing streamed: parts come from resident-first only');
    if (residentFirst) t.ok(store.parts > 0, `${store.parts} resident parts ran before the misses`);
    else t.equal(store.parts, 0);
    t.same(runner.audit(), []);
    runner.close();
  }
});

t.test('forecast: next-step prefetches from its own forecast, at a lower priority than demand (store double)', async (t) => {
  const x = await model(t, 'qwen3_moe', 4);
  const ref = resident(x, 2);
  t.teardown(() => ref.close());
  const { runner, store } = faked(x, 2, 24, { policy: 'forecast', lookahead: 2, nextStepMinProbability: 0.05, maxQueuedPrefetches: 64 });
  t.teardown(() => runner.close());
  t.same(compare(ref, runner, x.vocabLimit, 2, 30, 5), [], 'every step bitwise equal');
  t.same(runner.audit(), []);
  const st = runner.offloadStats();
  const issued = st.layers.reduce((a, l) => a + l.prefetchIssued, 0);
  t.ok(issued > 0, `${issued} prefetches issued`);
  t.ok(store.priorities.some((p) => p === 2), 'next-step prefetches are read with priority 2');
  t.ok(store.priorities.every((p) => p === 0 || p === 1 || p === 2), 'demand 0, this step 1, next step 2');
});

t.test('fewer slots than top-k: every visit streams, still bitwise equal (store double)', async (t) => {
  const x = await model(t, 'qwen3_moe', 3); // top-8 of 32
  const ref = resident(x, 3);
  t.teardown(() => ref.close());
  for (const slots of [1, 3]) {
    for (const policy of ['lru', 'predictive']) {
      const { runner, store } = faked(x, 3, slots, { policy, lookahead: 2 });
      t.same(compare(ref, runner, x.vocabLimit, 3, 6), [], `${slots} slot(s), ${policy}`);
      const st = runner.offloadStats();
      t.equal(
        st.layers.reduce((a, l) => a + l.streamedVisits, 0),
        st.layers.reduce((a, l) => a + l.visits, 0),
        'every visit streamed',
      );
      t.ok(store.parts > 0);
      t.same(runner.audit(), []);
      runner.close();
    }
  }
});

t.test('an unequal split across layers: each layer its own slots, logits bitwise equal (store double)', async (t) => {
  const x = await model(t, 'qwen3_moe', 4); // top-8 of 32
  const ref = resident(x, 4);
  t.teardown(() => ref.close());
  // Layer 0 holds most of its experts, layer 3 fewer than top-k (every visit streams).
  const slots = [20, 10, 3, 1];
  for (const policy of ['lru', 'forecast']) {
    const { runner, store } = faked(x, 4, slots, { policy, lookahead: 2 });
    t.same(compare(ref, runner, x.vocabLimit, 4, 10, 8), [], `${policy}: every step bitwise equal`);
    t.same(runner.audit(), [], 'policy slots and store agree');
    t.same(runner.slotsByLayer, slots);
    t.equal(runner.totalSlots, 34);
    t.same(runner.policy.capacities, slots, 'the policy has the same slots per layer');
    const st = runner.offloadStats();
    t.same(st.slotsByLayer, slots);
    t.equal(st.totalSlots, 34);
    t.equal(st.layers[3].streamedVisits, st.layers[3].visits, 'the one-slot layer streams every visit');
    t.ok(st.layers[0].hits > 2 * st.layers[3].hits, `the large layer hits more (${st.layers[0].hits} vs ${st.layers[3].hits})`);
    t.ok(store.held(0) > slots[1], `layer 0 uses slots beyond the other layers' count (${store.held(0)})`);
    const state = runner.expertCacheState();
    t.same(state.slotsByLayer, slots);
    state.layers.forEach((l, i) => {
      t.equal(l.capacity, slots[i], `layer ${i} reports its own slots`);
      t.equal(l.resident.length + l.loading.length + l.freeSlots, slots[i]);
      t.ok([...l.resident, ...l.loading].every((r) => r.slot >= 0 && r.slot < slots[i]), `layer ${i}: every slot below ${slots[i]}`);
      t.ok(store.held(i) <= slots[i]);
    });
    runner.close();
  }
  const inner = resident(x, 1).engine;
  t.teardown(() => inner.close());
  const store = new FakeOffloadStore(inner, { layers: 4, experts: 32 }, slots);
  const kv = { blockSize: BLOCK, numBlocks: 8 };
  t.throws(() => new OffloadRunner(x.spec, kv, store, [4, 4, 4]), /3 layer counts for a model of 4 layers/);
  t.throws(() => new OffloadRunner(x.spec, kv, store, [4, 0, 4, 4]), /slots per layer must be an integer in \[1, 32\], got 0 for layer 1/);
  t.throws(() => new OffloadRunner(x.spec, kv, store, [4, 4, 33, 4]), /got 33 for layer 2/);
});

t.test('a failed read fails its step; the cache starts over and later steps are bitwise equal again', async (t) => {
  const x = await model(t, 'qwen3_moe', 3);
  const ref = resident(x, 4);
  t.teardown(() => ref.close());
  const { runner, store } = faked(x, 4, 12, { policy: 'predictive', lookahead: 2 });
  t.teardown(() => runner.close());
  t.same(compare(ref, runner, x.vocabLimit, 2, 3), []);
  // A new sequence's step: the read of the first expert it needs at layer 0 fails.
  const prompt = Uint32Array.from([11, 12, 13, 14]);
  const batch = [{ seqId: 3, tokens: prompt, startPos: 0, blockTable: Int32Array.from({ length: BLOCKS_PER_SEQ }, (_, j) => 3 * BLOCKS_PER_SEQ + j), wantLogits: true }];
  // Fail whichever expert the step needs first at layer 0: find it from the resident engine's routing.
  const logits0 = (() => {
    ref.engine.beginStep(Int32Array.from(prompt), Int32Array.from([0, 4, 1, BLOCKS_PER_SEQ]), batch[0].blockTable);
    return ref.engine.attention(0);
  })();
  store.failNext = { layer: 0, expert: ref.engine.route(logits0, 4).ids[0] };
  t.throws(() => runner.step(batch), /read of expert \d+ of layer 0 failed/);
  t.equal(runner.offloadStats().cacheResets, 1, 'the cache started over');
  t.same(runner.audit(), [], 'store and policy agree after the reset');
  t.same(compare(ref, runner, x.vocabLimit, 3, 4, 9), [], 'later steps bitwise equal');
});

t.test('need calibration: overconfident probabilities come down, calibrated ones stay', async (t) => {
  const c = new NeedCalibration(2);
  const rng = new Rng(4);
  // Distance 1: the model says 0.9 for 8 experts, but only one in ten is needed.
  // Distance 2: the model says 0.75 and three in four are needed.
  for (let v = 0; v < 200; v++) {
    const p1 = new Float64Array(32);
    const n1 = new Uint8Array(32);
    const p2 = new Float64Array(32);
    const n2 = new Uint8Array(32);
    for (let x = 0; x < 8; x++) {
      p1[x] = 0.9;
      n1[x] = rng.u32() % 10 === 0 ? 1 : 0;
      p2[x] = 0.75;
      n2[x] = rng.u32() % 4 !== 0 ? 1 : 0;
    }
    c.observe(1, p1, n1);
    c.observe(2, p2, n2);
  }
  t.ok(Math.abs(c.calibrate(1, 0.9) - 0.1) < 0.03, `overconfident 0.9 → ${c.calibrate(1, 0.9).toFixed(3)}`);
  t.ok(Math.abs(c.calibrate(2, 0.75) - 0.75) < 0.05, `calibrated 0.75 → ${c.calibrate(2, 0.75).toFixed(3)}`);
  t.equal(c.calibrate(1, 0.35), 0.35, 'an empty bin keeps the model value');
  t.equal(c.calibrate(3, 0.5), 0.5, 'beyond the distances: the model value');
});

t.test('replayed routing that pre-gating cannot predict: prefetching mostly stops, and so does pre-gating', async (t) => {
  const x = await model(t, 'qwen3_moe', 4);
  const { path } = writeTrace(tempDir(t));
  const run = async (replay: boolean, pregatingMinLift?: number) => {
    const rp = replay ? await RoutingReplay.load(path, { layers: 4, experts: 32 }) : undefined;
    const { runner, store } = faked(x, 3, 12, { policy: 'lru', lookahead: 2, replay: rp, pregatingMinLift });
    const ref = resident(x, 3, { replay: replay ? await RoutingReplay.load(path, { layers: 4, experts: 32 }) : undefined });
    t.same(compare(ref, runner, x.vocabLimit, 3, 40, 6), []);
    const st = runner.offloadStats();
    const issued = st.layers.reduce((a, l) => a + l.prefetchIssued, 0);
    const used = st.layers.reduce((a, l) => a + l.prefetchUsed, 0);
    t.same(runner.audit(), []);
    runner.close();
    ref.close();
    const chance = (rp ? rp.k : x.spec.topK) / x.spec.numExperts;
    return { issued, used, precision: st.prediction[0].precision, lift: st.prediction[0].precision / chance, predictions: st.prediction[0].predicted, calls: store.calls.predictRouter, skipped: st.pregatingSkipped ?? -1 };
  };
  const own = await run(false);
  const replayed = await run(true);
  const always = await run(true, 0);
  t.comment(
    `own routing: ${own.issued} prefetches, ${own.used} used (precision ${own.precision.toFixed(2)}, ${own.lift.toFixed(2)}x chance), ${own.calls} predictRouter calls; ` +
      `replayed: ${replayed.issued}, ${replayed.used} used (precision ${replayed.precision.toFixed(2)}), ${replayed.calls} calls, ${replayed.skipped} visits skipped; ` +
      `pre-gating always: ${always.calls} calls (precision ${always.precision.toFixed(2)}, ${always.lift.toFixed(2)}x chance)`,
  );
  t.ok(replayed.precision < own.precision, 'pre-gating predicts the model, not the trace');
  t.ok(replayed.used / Math.max(1, replayed.issued) >= 0.3 || replayed.issued < own.issued / 2, 'prefetches from poor predictions are few or still mostly useful');
  // The default pregatingMinLift is 1.5.
  t.equal(always.skipped, 0, 'pregatingMinLift 0: never skipped');
  t.ok(always.lift < 1.5, `replayed: precision ${always.lift.toFixed(2)}x chance`);
  t.ok(replayed.skipped > 0, 'replayed: visits skipped pre-gating');
  t.ok(replayed.calls < always.calls / 2, `replayed: ${replayed.calls} predictRouter calls, against ${always.calls} when pre-gating always runs`);
  // Probe steps keep measuring it (every 16th step runs every distance).
  t.ok(replayed.predictions > always.predictions / 8 && replayed.predictions < always.predictions, 'probe steps still measure it');
});

t.test('pre-gating that predicts keeps running at every distance', async (t) => {
  const x = await model(t, 'qwen3_moe', 4);
  const E = x.spec.numExperts;
  const K = x.spec.topK;
  const ref = resident(x, 3);
  t.teardown(() => ref.close());
  // A first run records each step's routing; in the second, the double's pre-gating gives
  // the step's true routing of the next layers (logits with the true top-k on top).
  const recorded: Int32Array[][] = [];
  const first = faked(x, 3, 12, { policy: 'lru', lookahead: 2, onRouting: (e) => (e.layer === 0 ? recorded.push([e.ids.slice()]) : recorded[recorded.length - 1].push(e.ids.slice())) });
  t.same(compare(ref, first.runner, x.vocabLimit, 3, 40, 6), []);
  first.runner.close();
  let done = 0;
  const prediction = (from: number, to: number): Float32Array => {
    const step = recorded[done];
    const T = step[0].length / K;
    const out = new Float32Array((to - from) * T * E);
    for (let m = from + 1; m <= to; m++) for (let i = 0; i < step[m].length; i++) out[((m - from - 1) * T + Math.floor(i / K)) * E + step[m][i]] = 1;
    return out;
  };
  const inner = resident(x, 3).engine;
  t.teardown(() => inner.close());
  const store = new FakeOffloadStore(inner, { layers: 4, experts: E }, 12, { prediction });
  const runner = new OffloadRunner(x.spec, { blockSize: BLOCK, numBlocks: 3 * BLOCKS_PER_SEQ }, store, 12, { policy: 'lru', lookahead: 2, onRouting: (e) => (done += e.layer === 0 ? 1 : 0) });
  t.teardown(() => runner.close());
  t.same(compare(ref, runner, x.vocabLimit, 3, 40, 6), [], 'every step bitwise equal');
  t.equal(done, recorded.length, 'the same steps');
  const st = runner.offloadStats();
  t.same(st.prediction.map((p) => p.precision), [1, 1], 'the double predicts exactly');
  t.equal(st.pregatingSkipped, 0, 'never skipped');
  // Every layer with a later one predicts, every step.
  t.equal(store.calls.predictRouter, 3 * recorded.length);
});

t.test('replayed routing that follows across layers: the co-occurrence forecast learns it and its prefetches are used', async (t) => {
  const x = await model(t, 'qwen3_moe', 4); // 4 layers × 32 experts
  // Layer 0 random; each later layer's experts a fixed function of the layer below's, as
  // real routers correlate across layers (here perfectly).
  const lines = ['# moe-trace v1', '# model=chain layers=4 experts=32 top_k=4 source=unit test', 'request,phase,position,layer,experts,weights'];
  const rng = new Rng(5);
  for (let p = 0; p < 80; p++) {
    let ids: number[] = [];
    const set = new Set<number>();
    while (set.size < 4) set.add(rng.u32() % 32);
    ids = [...set];
    for (let l = 0; l < 4; l++) {
      if (l > 0) ids = ids.map((e) => (e * 5 + 3 + l) % 32);
      lines.push(`0,${p < 4 ? 'prefill' : 'decode'},${p},${l},${ids.join(' ')},`);
    }
  }
  const path = join(tempDir(t), 'chain.trace.csv');
  writeFileSync(path, lines.join('\n') + '\n');
  const run = async (coOccurrence: boolean) => {
    const replay = await RoutingReplay.load(path, { layers: 4, experts: 32 });
    // Reads complete after the visit that issued them (one per layer visit), so a
    // prefetch for l+1 is in time; 6 slots per layer hold little beyond one token's 4.
    const { runner } = faked(x, 1, 6, { policy: 'lru', lookahead: 1, replay, coOccurrence, prefetchMinProbability: 0.3 });
    const ref = resident(x, 1, { replay: await RoutingReplay.load(path, { layers: 4, experts: 32 }) });
    t.same(compare(ref, runner, x.vocabLimit, 1, 60, 3), [], `co-occurrence ${coOccurrence}: logits bitwise equal`);
    const st = runner.offloadStats();
    runner.close();
    ref.close();
    const sum = (f: (l: (typeof st.layers)[number]) => number) => st.layers.reduce((a, l) => a + f(l), 0);
    return { st, issued: sum((l) => l.prefetchIssued), used: sum((l) => l.prefetchUsed), misses: sum((l) => l.misses) };
  };
  const on = await run(true);
  const off = await run(false);
  const co = on.st.coPrediction![0];
  t.comment(`co-occurrence d=1: recall ${co.recall.toFixed(3)}, precision ${co.precision.toFixed(3)}; prefetches ${on.issued} issued, ${on.used} used, demand misses ${on.misses} (without it: ${off.issued}/${off.used}, misses ${off.misses})`);
  // Chance is 4 of 32 (0.125). The forecast averages its experts' co-occurrence rows, so
  // an expert seen only a few times is outvoted by the chance co-occurrences of frequent
  // ones: over the first 60 tokens recall is about 0.67, and it rises with the counts.
  t.ok(co.recall > 0.5, `the co-occurrence forecast learns a deterministic chain (recall ${co.recall.toFixed(3)} > 0.5)`);
  t.same(off.st.coPrediction, [], 'off: no co-occurrence figures');
  t.ok(on.used > off.used && on.used >= 0.4 * on.issued, `its prefetches are used (${on.used} of ${on.issued})`);
  t.ok(on.misses < off.misses, `fewer demand misses (${on.misses} < ${off.misses})`);
});

t.test('stale prefetches still queued are cancelled in the store and the policy', async (t) => {
  const x = await model(t, 'qwen3_moe', 4);
  const ref = resident(x, 4);
  t.teardown(() => ref.close());
  // No read completes on its own: prefetches stay queued until their layer's visit.
  const { runner, store } = faked(x, 4, 16, { policy: 'lru', lookahead: 2, prefetchMinProbability: 0.01, maxQueuedPrefetches: 64 }, 0);
  t.teardown(() => runner.close());
  t.same(compare(ref, runner, x.vocabLimit, 4, 8), []);
  const st = runner.offloadStats();
  const cancelled = st.layers.reduce((a, l) => a + l.prefetchCancelled, 0);
  t.ok(cancelled > 0, `${cancelled} prefetches cancelled`);
  t.equal(store.calls.cancelled, cancelled, 'each one withdrawn from the store');
  t.same(runner.audit(), []);
});

t.test('queued prefetches a closer prediction no longer supports are withdrawn before their visit', async (t) => {
  const x = await model(t, 'qwen3_moe', 4);
  const ref = resident(x, 3);
  t.teardown(() => ref.close());
  // Reads never start on their own, and each predictRouter call gives different noise:
  // distance-2 prefetches are often not predicted again at distance 1.
  // Pre-gating alone: the co-occurrence forecast would support some of them again.
  // Pre-gating at every step although it predicts nothing (pregatingMinLift 0).
  const { runner, store } = faked(x, 3, 16, { policy: 'lru', lookahead: 2, prefetchMinProbability: 0.2, maxQueuedPrefetches: 64, coOccurrence: false, pregatingMinLift: 0 }, 0, true);
  t.teardown(() => runner.close());
  t.same(compare(ref, runner, x.vocabLimit, 3, 20, 2), []);
  t.ok(store.calls.cancelledAhead > 0, `${store.calls.cancelledAhead} withdrawn ahead of their visit`);
  const st = runner.offloadStats();
  t.equal(st.layers.reduce((a, l) => a + l.prefetchCancelled, 0), store.calls.cancelled, 'every withdrawal counted');
  t.same(runner.audit(), []);
});

t.test('the cache state lists slots, loading experts and counters per layer', async (t) => {
  const x = await model(t, 'mixtral', 3);
  const { runner } = faked(x, 2, 4, { policy: 'lru', lookahead: 1 }, 0);
  t.teardown(() => runner.close());
  const ref = resident(x, 2);
  t.teardown(() => ref.close());
  compare(ref, runner, x.vocabLimit, 2, 3);
  const s = runner.expertCacheState();
  t.equal(s.layers.length, 3);
  t.equal(s.policy, 'lru');
  for (const l of s.layers) {
    t.equal(l.capacity, 4);
    t.equal(l.resident.length + l.loading.length + l.freeSlots, 4);
    const slots = [...l.resident, ...l.loading].map((r) => r.slot);
    t.equal(new Set(slots).size, slots.length, 'one expert per slot');
    t.ok(l.counters.hits + l.counters.misses > 0);
  }
  t.ok(s.layers.some((l) => l.resident.length > 0));
  t.ok(runner.pin(0, s.layers[0].resident[0].expert), 'pin a resident expert');
  t.same(runner.expertCacheState().layers[0].pinned, [s.layers[0].resident[0].expert]);
});

t.test('bad offload settings give clear errors', async (t) => {
  const x = await model(t, 'qwen3_moe', 2);
  const ckpt = x.m.weights;
  const base = { weights: 'f32' as const, threads: 1, kvBlockSize: BLOCK, kvBlocks: 8, policy: 'lru' };
  t.throws(() => OffloadRunner.fromCheckpoint(x.spec, ckpt, { ...base, capacity: '0.01' }), /gives no expert slot per layer/);
  t.throws(() => OffloadRunner.fromCheckpoint(x.spec, ckpt, { ...base, capacity: 'lots' }), /expert cache capacity "lots": not a number/);
  t.throws(() => OffloadRunner.fromCheckpoint(x.spec, ckpt, { ...base, capacity: '0.5', dir: '/nonexistent/moe-serve' }), /offload directory "\/nonexistent\/moe-serve" is not a writable directory/);
  t.throws(() => OffloadRunner.fromCheckpoint(x.spec, ckpt, { ...base, capacity: '0.5', ioThreads: 0 }), /I\/O threads must be an integer in \[1, 256\]/);
  // The split's number of weights is known to be wrong only once the model is open.
  t.throws(() => OffloadRunner.fromCheckpoint(x.spec, ckpt, { ...base, capacity: '0.5', split: '1,2,3' }), CapacityError);
  t.throws(() => OffloadRunner.fromCheckpoint(x.spec, ckpt, { ...base, capacity: '0.5', split: '1,2,3' }), /setting offloadSplit: expert cache split "1,2,3": 3 weights, but the model has 2 layers/);
  t.throws(() => OffloadRunner.fromCheckpoint(x.spec, ckpt, { ...base, capacity: '0.5', split: '1,x' }), /setting offloadSplit: expert cache split "1,x": weight 2 \("x"\) is not a number/);
  t.throws(() => OffloadRunner.fromCheckpoint(x.spec, ckpt, { ...base, capacity: '0.01', split: '1,1' }), /0.01 of 32 experts per layer gives 0 expert slots for 2 layers/);
  const inner = resident(x, 1).engine;
  t.teardown(() => inner.close());
  const store = new FakeOffloadStore(inner, { layers: 2, experts: 32 }, 8);
  t.throws(() => new OffloadRunner(x.spec, { blockSize: BLOCK, numBlocks: 8 }, store, 8, { policy: 'belady' }), /belady needs the future/);
  t.throws(() => new OffloadRunner(x.spec, { blockSize: BLOCK, numBlocks: 8 }, store, 8, { lookahead: -1 }), /lookahead must be an integer >= 0/);
  t.throws(() => new OffloadRunner(x.spec, { blockSize: BLOCK, numBlocks: 8 }, store, 0), /slots per layer must be an integer in \[1, 32\]/);
  t.throws(() => new OffloadRunner(x.spec, { blockSize: BLOCK, numBlocks: 8 }, store, 33), /slots per layer must be an integer in \[1, 32\]/);
});

// ---- Routing replay ----

/** A trace of 3 layers × 40 experts, top-4, two requests; request 1 lacks layer 2 at position 0. */
function writeTrace(dir: string): { path: string; rows: Map<string, number[]> } {
  const rows = new Map<string, number[]>();
  const lines = ['# moe-trace v1', '# model=test-trace layers=3 experts=40 top_k=4 source=unit test', 'request,phase,position,layer,experts,weights'];
  const rng = new Rng(77);
  for (const [req, n] of [
    [0, 5],
    [1, 3],
  ]) {
    for (let p = 0; p < n; p++) {
      for (let l = 0; l < 3; l++) {
        if (req === 1 && p === 0 && l === 2) continue;
        let ids: number[];
        if (req === 0 && p === 0 && l === 0) ids = [3, 35, 7, 39]; // 35 → 3 folds onto 3 for 32 experts
        else {
          const set = new Set<number>();
          while (set.size < 4) set.add(rng.u32() % 40);
          ids = [...set];
        }
        rows.set(`${req}/${p}/${l}`, ids);
        lines.push(`${req},${p < 2 ? 'prefill' : 'decode'},${p},${l},${ids.join(' ')},`);
      }
    }
  }
  const path = join(dir, 'replay.trace.csv');
  writeFileSync(path, lines.join('\n') + '\n');
  return { path, rows };
}

t.test('routing replay takes the trace ids with the stated mapping, resident and offloaded alike', async (t) => {
  const x = await model(t, 'qwen3_moe', 4); // 4 layers × 32 experts, top-8
  const { path, rows } = writeTrace(tempDir(t));
  const replayA = await RoutingReplay.load(path, { layers: 4, experts: 32 });
  const replayB = await RoutingReplay.load(path, { layers: 4, experts: 32 });
  t.equal(replayA.k, 4, 'k is the trace top-k');
  t.match(replayA.describe(), /layer l → l mod 3, expert e → e mod 32, k = 4/);
  const seen: RoutingEvent[] = [];
  const seenOff: RoutingEvent[] = [];
  const ref = resident(x, 3, { replay: replayA, onRouting: (e) => seen.push(e) });
  t.teardown(() => ref.close());
  const { runner } = faked(x, 3, 6, { policy: 'predictive', lookahead: 2, replay: replayB, onRouting: (e) => seenOff.push(e) });
  t.teardown(() => runner.close());
  t.same(compare(ref, runner, x.vocabLimit, 3, 8), [], 'offloaded replay bitwise equal to resident replay');

  let checked = 0;
  let folded = 0;
  let missing = 0;
  for (const ev of seen) {
    t.equal(ev.k, 4);
    for (let i = 0; i < ev.seq.length; i++) {
      const req = ev.seq[i] % 2;
      const len = req === 0 ? 5 : 3;
      const p = ev.pos[i] % len;
      const ids = Array.from(ev.ids.subarray(i * 4, i * 4 + 4));
      t.equal(new Set(ids).size, 4, 'distinct ids');
      const w = ev.weights.subarray(i * 4, i * 4 + 4);
      t.ok(Math.abs(w.reduce((a, b) => a + b, 0) - 1) < 1e-5, 'weights renormalised over the chosen ids');
      const row = rows.get(`${req}/${p}/${ev.layer % 3}`);
      if (!row) {
        missing++;
        continue;
      }
      const mapped = [...new Set(row.map((e) => e % 32))];
      t.same(ids.slice(0, mapped.length), mapped, `seq ${ev.seq[i]} pos ${ev.pos[i]} layer ${ev.layer}`);
      if (mapped.length < 4) folded++;
      checked++;
    }
  }
  t.ok(checked > 100, `${checked} token-layer routings checked against the trace`);
  t.ok(folded > 0, 'a folded row was filled by the router');
  t.ok(missing > 0, 'a row missing from the trace was routed by the router');
  // The offload runner saw the same routing as the resident one.
  t.equal(seenOff.length > 0, true);
  const key = (e: RoutingEvent) => `${e.layer}:${Array.from(e.seq).join(',')}:${Array.from(e.pos).join(',')}:${Array.from(e.ids).join(',')}`;
  const resSet = new Set(seen.map(key));
  t.ok(seenOff.every((e) => resSet.has(key(e)) || e.seq.length < seen.find((s) => s.layer === e.layer)!.seq.length), 'offloaded routing matches (split steps route subsets)');
  t.same(replayA.stats().missingRows > 0, true);

  // Live hints for the batch policy: each sequence's recent routing, the same in both
  // runners (they saw the same routing), its last token's experts at weight 1.
  for (let s = 0; s < 3; s++) {
    const h = ref.routingHints(s);
    const hOff = runner.routingHints(s);
    t.ok(h && hOff, `hints for sequence ${s}`);
    if (!h || !hOff) continue;
    t.same(hOff, h, `sequence ${s}: offloaded hints equal resident ones`);
    const lastEv = [...seen].reverse().find((e) => e.layer === 2 && Array.from(e.seq).includes(s))!;
    const i = Array.from(lastEv.seq).lastIndexOf(s);
    for (const id of lastEv.ids.subarray(i * 4, i * 4 + 4)) t.equal(h.weights![2][h.experts[2].indexOf(id)], 1, `sequence ${s}: last token's expert ${id} at weight 1`);
    t.ok(h.experts[2].length > 4, 'older tokens\' experts are hinted too');
  }
  ref.release(0);
  runner.release(0);
  t.equal(ref.routingHints(0), undefined, 'released: no hints');
  t.equal(runner.routingHints(0), undefined, 'released: no hints');
});

t.test('replayedRequests: the routing the replay gives sequences 0..R-1, as requests a simulator runs', async (t) => {
  const { path, rows } = writeTrace(tempDir(t));
  const { header, requests } = await loadTrace(path);
  const shape = { layers: 4, experts: 40 };
  const positions = 7; // request 0 has 5 tokens, request 1 has 3: both wrap
  const sim = replayedRequests(header, requests, shape, positions);
  t.same([sim.header.layers, sim.header.experts, sim.header.topK], [4, 40, 4]);
  t.equal(sim.requests.length, 2);
  const replay = new RoutingReplay(header, requests, shape, path);
  let compared = 0;
  let skipped = 0;
  for (let r = 0; r < 2; r++) {
    t.equal(sim.requests[r].tokens.length, positions, `request ${r}: one token per position`);
    for (let p = 0; p < positions; p++) {
      const tok = sim.requests[r].tokens[p];
      t.equal(tok.position, p);
      for (let l = 0; l < shape.layers; l++) {
        const row = Array.from(tok.experts.subarray(l * 4, l * 4 + 4));
        const live = replay.route(l, new Float32Array(shape.experts), { seq: Int32Array.of(r), pos: Int32Array.of(p) });
        const traced = rows.get(`${r}/${p % (r === 0 ? 5 : 3)}/${l % 3}`);
        if (!traced) {
          // The replay routes a missing row by the router; the simulator skips the visit.
          t.same(row, [NO_EXPERT, NO_EXPERT, NO_EXPERT, NO_EXPERT], `request ${r} position ${p} layer ${l}: missing row stays missing`);
          skipped++;
          continue;
        }
        t.same(row, Array.from(live.ids), `request ${r} position ${p} layer ${l}: the replay's ids`);
        compared++;
      }
    }
  }
  t.ok(compared > 40 && skipped > 0, `${compared} routings equal the replay's, ${skipped} missing rows`);
  // Fewer experts than the trace's ids: a folded row needs the router, which no simulator has.
  t.throws(() => replayedRequests(header, requests, { layers: 4, experts: 32 }, 3), /fold onto 2 of 4 distinct experts of 32/);
  t.throws(() => replayedRequests(header, requests, shape, 0), /positions must be an integer >= 1/);
});

// ---- The addon's own expert store ----

t.test('native expert store: bitwise equal to resident, prefetch and pre-gating measured', { skip: NO_OFFLOAD_SKIP }, async (t) => {
  const x = await model(t, 'qwen3_moe', 4);
  const nSeq = 5;
  const ref = resident(x, nSeq);
  t.teardown(() => ref.close());
  const dir = tempDir(t);
  for (const [capacity, slots] of [
    ['0.1', 3],
    ['0.3125', 10],
    ['75%', 24],
  ] as const) {
    for (const policy of ['lru', 'predictive', 'forecast']) {
      for (const lookahead of [0, 2]) {
        const off = OffloadRunner.fromCheckpoint(x.spec, x.m.weights, {
          weights: 'f32',
          threads: 2,
          kvBlockSize: BLOCK,
          kvBlocks: nSeq * BLOCKS_PER_SEQ,
          capacity,
          policy,
          lookahead,
          ioThreads: 2,
          dir,
        });
        t.same(off.slotsByLayer, new Array(4).fill(slots));
        t.equal(off.totalSlots, 4 * slots);
        const bad = compare(ref, off, x.vocabLimit, nSeq, 10, 3);
        t.same(bad, [], `${slots} slots, ${policy}, lookahead ${lookahead}: every step bitwise equal`);
        t.same(off.audit(), [], 'policy slots and store agree');
        const st = off.offloadStats();
        t.ok(st.loads > 0 && st.bytesLoaded >= st.loads * st.slotBytes - 1, `${st.loads} loads, ${st.bytesLoaded} bytes`);
        if (lookahead > 0) t.ok(st.prediction.every((p) => p.actual > 0), 'pre-gating measured');
        off.close();
      }
    }
  }
  // An unequal split of the same budget (10 slots per layer on average, 40 in all): the
  // layer of weight 0 keeps one slot, the other 39 go 3:1:1 (23.4, 7.8, 7.8 → 23, 8, 8
  // by largest remainder).
  const split = OffloadRunner.fromCheckpoint(x.spec, x.m.weights, {
    weights: 'f32',
    threads: 2,
    kvBlockSize: BLOCK,
    kvBlocks: nSeq * BLOCKS_PER_SEQ,
    capacity: '0.3125',
    split: '3,1,1,0',
    policy: 'forecast',
    lookahead: 2,
    ioThreads: 2,
    dir,
  });
  t.teardown(() => split.close());
  t.same(split.slotsByLayer, [23, 8, 8, 1]);
  t.same(compare(ref, split, x.vocabLimit, nSeq, 10, 3), [], 'split 3,1,1,0: every step bitwise equal');
  t.same(split.audit(), [], 'policy slots and store agree');
  const sst = split.offloadStats();
  t.same(sst.slotsByLayer, [23, 8, 8, 1]);
  t.equal(sst.layers[3].streamedVisits, sst.layers[3].visits, 'the one-slot layer streams every visit');
  // The store's arenas hold the real total: 40 slots, not 4 x the largest.
  const info = (split.engine as unknown as { info(): { weightBytes: number; expertBytes: number } }).info();
  const resInfo = ref.engine.info();
  t.equal(info.weightBytes, resInfo.weightBytes - 4 * 32 * resInfo.expertBytes + 40 * sst.slotBytes, 'arena bytes = 40 slots');
  const cs = split.expertCacheState();
  t.same(cs.layers.map((l) => l.capacity), [23, 8, 8, 1]);
  t.ok(cs.layers[0].resident.some((r) => r.slot >= 8), 'layer 0 fills slots beyond the others\' count');

  // Quantized weights: the same bits from the slots, streamed visits included.
  const ref8 = resident(x, nSeq, { weights: 'q8' });
  t.teardown(() => ref8.close());
  const off8 = OffloadRunner.fromCheckpoint(x.spec, x.m.weights, { weights: 'q8', threads: 2, kvBlockSize: BLOCK, kvBlocks: nSeq * BLOCKS_PER_SEQ, capacity: '0.3125', policy: 'predictive', lookahead: 2, dir });
  t.teardown(() => off8.close());
  t.same(compare(ref8, off8, x.vocabLimit, nSeq, 6, 4), [], 'q8 at 10 slots: bitwise equal');
  t.ok(off8.offloadStats().layers.reduce((a, l) => a + l.streamedVisits, 0) > 0, 'visits streamed');
  const q = measurePregating(ref.engine, { layers: 4, experts: 32, topK: 8 }, [[{ seqId: 0, tokens: Uint32Array.from([5, 6, 7, 8, 9]), startPos: 0, blockTable: Int32Array.from([0]), wantLogits: true }]], 2, packBatch);
  t.equal(q.length, 2);
  t.ok(q[0].actual === 5 * 8 * 3 && q[0].recall > 0.25, `distance 1 recall ${q[0].recall}`);
});

t.test('moe-serve generate: --offload-* flags give the same greedy text as the resident engine', { skip: NO_OFFLOAD_SKIP }, async (t) => {
  const { runGenerate } = await import('../src/cli/generate-cmd.js');
  const x = await model(t, 'qwen3_moe', 4);
  const run = async (extra: object) => {
    let text = '';
    await runGenerate({ model: x.dir, prompt: 'Experts in a mixture', chat: false, maxTokens: 24, temperature: 0, topP: 1, topK: 0, seed: 0, weights: 'f32', threads: 2, ...extra }, (s) => (text += s));
    return text;
  };
  const plain = await run({});
  const offloaded = await run({ offload: { capacity: '0.25', policy: 'lru', lookahead: 2, ioThreads: 1, dir: tempDir(t) } });
  t.ok(plain.length > 1);
  t.equal(offloaded, plain);
  const { generateCommand } = await import('../src/cli/generate-cmd.js');
  const splitText = await run({ offload: { capacity: '0.25', split: '4,2,1,1', policy: 'lru', lookahead: 2, ioThreads: 1, dir: tempDir(t) } });
  t.equal(splitText, plain, 'with an unequal split too');
  await t.rejects(generateCommand.run(['--model', x.dir, '--prompt', 'x', '--offload-policy', 'lru']), /--offload-policy needs --offload-capacity/);
  await t.rejects(generateCommand.run(['--model', x.dir, '--prompt', 'x', '--offload-split', '1,1,1,1']), /--offload-split needs --offload-capacity/);
  await t.rejects(generateCommand.run(['--model', x.dir, '--prompt', 'x', '--offload-capacity', '0.5', '--offload-split', '1,-1']), /--offload-split: expert cache split "1,-1": weight 2 \("-1"\) is negative/);
  await t.rejects(generateCommand.run(['--model', x.dir, '--prompt', 'x', '--offload-capacity', '0.5', '--offload-split', '1,1']), /^--offload-split: expert cache split "1,1": 2 weights, but the model has 4 layers/, 'generate names its flag');
  await t.rejects(generateCommand.run(['--model', x.dir, '--prompt', 'x', '--offload-capacity', '0.5', '--offload-policy', 'belady']), /--offload-policy must be one of lru, lfu, lfu-decay, predictive/);
  // The prefetch threshold: auto by default (measured at load), a set probability, or a usage error.
  const autoText = await run({ offload: { capacity: '0.25', policy: 'forecast', lookahead: 2, prefetchMinProbability: 'auto', ioThreads: 1, dir: tempDir(t) } });
  t.equal(autoText, plain, 'auto threshold: the same text');
  const setText = await run({ offload: { capacity: '0.25', policy: 'forecast', lookahead: 2, prefetchMinProbability: 0.7, ioThreads: 1, dir: tempDir(t) } });
  t.equal(setText, plain, 'a set threshold: the same text');
  await t.rejects(generateCommand.run(['--model', x.dir, '--prompt', 'x', '--offload-prefetch-min-probability', '0.5']), /--offload-prefetch-min-probability needs --offload-capacity/);
  await t.rejects(
    generateCommand.run(['--model', x.dir, '--prompt', 'x', '--offload-capacity', '0.5', '--offload-prefetch-min-probability', 'often']),
    /--offload-prefetch-min-probability must be auto or a number in \[0, 1\], got "often"/,
  );
});
