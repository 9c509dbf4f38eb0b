// The prefetch threshold from the measured read cost (read-cost.ts): the rule, the probe
// on a real offloading engine (it leaves the slots empty and the results unchanged), the
// 'auto' setting through OffloadRunner.fromCheckpoint and the server's settings.
import t from 'tap';
import { ConfigError, parsePrefetchMinProbability } from '../src/config.js';
import type { NativeEngine } from '../src/engine/native.js';
import { NativeRunner } from '../src/engine/native-runner.js';
import type { StepSequence } from '../src/engine/runner.js';
import { openModel } from '../src/model/checkpoint.js';
import { OffloadRunner } from '../src/offload/offload-runner.js';
import { measureReadCost, PREFETCH_MIN_PROBABILITY_CAP, PREFETCH_MIN_PROBABILITY_FLOOR, prefetchThreshold } from '../src/offload/read-cost.js';
import { writeModel } from './helpers/models.js';
import { NO_OFFLOAD_SKIP } from './helpers/offload.js';

t.test('the threshold: the measured slowdown, between the floor and the cap', async (t) => {
  t.equal(PREFETCH_MIN_PROBABILITY_FLOOR, 0.3);
  t.equal(prefetchThreshold({ slowdown: 0 }), 0.3, 'reads that cost nothing: the floor');
  t.equal(prefetchThreshold({ slowdown: 0.2 }), 0.3);
  t.equal(prefetchThreshold({ slowdown: 0.45 }), 0.45, 'compute at x0.55 while reading: a prefetch must be used more often than 45%');
  t.equal(prefetchThreshold({ slowdown: 0.97 }), PREFETCH_MIN_PROBABILITY_CAP);
  t.equal(prefetchThreshold({ slowdown: Number.NaN }), 0.3);
});

t.test('offloadPrefetchMinProbability: auto or a probability', async (t) => {
  t.equal(parsePrefetchMinProbability('auto'), 'auto');
  t.equal(parsePrefetchMinProbability(' 0.45 '), 0.45);
  t.equal(parsePrefetchMinProbability('0'), 0);
  t.equal(parsePrefetchMinProbability('1'), 1);
  for (const bad of ['', 'x', '-0.1', '1.5', 'NaN', 'Infinity', 'AUTO']) {
    t.throws(() => parsePrefetchMinProbability(bad), ConfigError, JSON.stringify(bad));
  }
  t.throws(() => parsePrefetchMinProbability('2'), /offloadPrefetchMinProbability must be "auto" or a number in \[0, 1\], got "2"/);
});

t.test('the probe on an offloading engine, and auto through fromCheckpoint', { skip: NO_OFFLOAD_SKIP }, async (t) => {
  const dir = writeModel(t, { arch: 'qwen3_moe', seed: 5, overrides: { numLayers: 2 } });
  const m = await openModel(dir);
  t.teardown(() => m.close());
  const spec = m.spec;
  const base = { weights: 'q8' as const, threads: 2, kvBlockSize: 16, kvBlocks: 8 };
  const plain = OffloadRunner.fromCheckpoint(spec, m.weights, { ...base, capacity: '0.5', policy: 'lru', lookahead: 0 });
  t.teardown(() => plain.close());
  t.equal(plain.readCost, null, 'no probe without prefetching');
  t.equal(plain.prefetchMinProbability, 0.3, 'the default threshold');
  t.equal(plain.offloadStats().readSlowdown, null);

  const cost = measureReadCost(plain.engine as unknown as NativeEngine, spec, plain.slotsByLayer, 'q8_0', 2);
  t.ok(cost.slowdown >= 0 && cost.slowdown <= 1, `slowdown ${cost.slowdown}`);
  t.ok(cost.coverage >= 0 && cost.coverage <= 1, `coverage ${cost.coverage}`);
  t.ok(cost.quietGBs > 0 && cost.readingGBs > 0 && cost.readGBs > 0, `${cost.quietGBs} / ${cost.readingGBs} GB/s, reads ${cost.readGBs} GB/s`);
  t.ok(cost.expertsRead >= 1 && cost.expertsRead <= plain.slotsByLayer.reduce((a, n) => a + n, 0));
  const state = plain.expertCacheState();
  t.ok(state.layers.every((l) => l.resident.length === 0 && l.loading.length === 0), 'every slot empty again');
  for (let l = 0; l < spec.numLayers; l++) for (let e = 0; e < spec.numExperts; e++) if (plain.engine.expertState(l, e) !== 0) t.fail(`layer ${l} expert ${e} left in the store`);

  // The runner after the probe gives the resident engine's logits, bit for bit.
  const resident = NativeRunner.fromCheckpoint(spec, m.weights, base);
  t.teardown(() => resident.close());
  const seq: StepSequence = { seqId: 0, tokens: Uint32Array.from([5, 17, 300, 41, 9]), startPos: 0, blockTable: Int32Array.from([0]), wantLogits: true };
  const a = plain.step([seq]).logits;
  const b = resident.step([seq]).logits;
  t.ok(a.length === b.length && a.every((v, i) => Object.is(v, b[i])), 'logits after the probe equal the resident engine\'s');

  const auto = OffloadRunner.fromCheckpoint(spec, m.weights, { ...base, capacity: '0.5', policy: 'forecast', lookahead: 2, prefetchMinProbability: 'auto' });
  t.teardown(() => auto.close());
  t.ok(auto.readCost !== null, 'auto measures');
  t.equal(auto.prefetchMinProbability, prefetchThreshold(auto.readCost!), `threshold ${auto.prefetchMinProbability} from slowdown ${auto.readCost!.slowdown}`);
  t.equal(auto.offloadStats().prefetchMinProbability, auto.prefetchMinProbability);
  t.equal(auto.offloadStats().readSlowdown, auto.readCost!.slowdown);
  t.ok(auto.expertCacheState().layers.every((l) => l.resident.length === 0), 'it starts with an empty cache');
  const c = auto.step([seq]).logits;
  t.ok(c.every((v, i) => Object.is(v, b[i])), 'and the same logits');

  const fixed = OffloadRunner.fromCheckpoint(spec, m.weights, { ...base, capacity: '0.5', policy: 'forecast', lookahead: 2, prefetchMinProbability: 0.55 });
  t.teardown(() => fixed.close());
  t.equal(fixed.readCost, null, 'a set threshold is not measured');
  t.equal(fixed.prefetchMinProbability, 0.55);
  t.throws(() => new OffloadRunner(spec, fixed.kv, fixed.engine, fixed.slotsByLayer, { prefetchMinProbability: 1.5 }), /prefetch minimum probability must be in \[0, 1\]/);
});
