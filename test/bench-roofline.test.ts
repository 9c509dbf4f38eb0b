// The engine benchmark's roofline arithmetic (bench/lib/engine-bench-common.ts): weight
// MACs per token, expected distinct experts of a batch and the per-step roofline, against
// hand-computed values for a small spec; and the stage-chain bound of a step.
import t from 'tap';
import { bytesPerToken, expectedDistinct, expertMacsPerToken, macsPerToken, measuredStages, rowBytes, stageChainBound, stepRoofline } from '../bench/lib/engine-bench-common.js';
import type { ModelSpec } from '../src/model/spec.js';

const spec = {
  arch: 'qwen3_moe',
  vocabSize: 1000,
  hiddenSize: 64,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 16,
  numExperts: 8,
  topK: 2,
  expertIntermediateSize: 32,
  sharedExpertIntermediateSize: 0,
  qkvBias: false,
  qkNorm: 'per_head',
} as unknown as ModelSpec;

t.test('weight MACs per token', async (t) => {
  // Per layer: q 64x64, k and v 64x32 each, o 64x64, router 64x8, 2 experts x 3 x 64x32.
  const perLayer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 64 * 8 + 2 * 3 * 64 * 32;
  t.equal(macsPerToken(spec), 2 * perLayer + 1000 * 64);
  const shared = { ...spec, sharedExpertIntermediateSize: 48 } as ModelSpec;
  t.equal(macsPerToken(shared) - macsPerToken(spec), 2 * 3 * 64 * 48, 'a shared expert adds its three matrices per layer');
});

t.test('expected distinct experts of n uniformly routed tokens', async (t) => {
  t.equal(expectedDistinct(8, 2, 0), 0);
  t.equal(expectedDistinct(8, 2, 1), 2);
  t.ok(Math.abs(expectedDistinct(8, 2, 2) - (2 + 2 * (6 / 8))) < 1e-12, 'two tokens: 2 + 2 x P(new)');
  t.ok(expectedDistinct(128, 8, 32) < 128 && expectedDistinct(128, 8, 32) > 110);
  t.ok(Math.abs(expectedDistinct(128, 8, 10000) - 128) < 1e-9, 'every expert once enough tokens route');
});

t.test('step roofline: the larger of weight traffic and weight MACs', async (t) => {
  const read = bytesPerToken(spec, 'q8_0');
  const one = stepRoofline(spec, read, 1, 10, 1e9);
  t.equal(one.bytes, read.total, 'one token reads what bytesPerToken counts');
  t.equal(one.macs, macsPerToken(spec));
  t.ok(one.memorySeconds > one.computeSeconds);
  t.equal(one.tokensPerSecond, 1 / one.memorySeconds, 'memory-bound at a huge MAC rate');
  const slow = stepRoofline(spec, read, 4, 10, 1e-3);
  t.equal(slow.macs, 4 * macsPerToken(spec));
  t.ok(slow.computeSeconds > slow.memorySeconds);
  t.equal(slow.tokensPerSecond, 4 / slow.computeSeconds, 'compute-bound at a tiny MAC rate');
  const four = stepRoofline(spec, read, 4, 10, 1e9);
  const expertBytes = four.bytes - (read.nonExpert + 3 * read.embedRow);
  t.ok(Math.abs(expertBytes - 2 * expectedDistinct(8, 2, 4) * read.perExpert) < 1e-6, 'experts read once per step for all tokens');
});

t.test('step roofline: routed experts at their own MAC peak', async (t) => {
  // 2 layers x top-2 x 3 matrices of 64 x 32.
  t.equal(expertMacsPerToken(spec), 2 * 2 * 3 * 64 * 32);
  const read = bytesPerToken(spec, 'q4_0');
  const same = stepRoofline(spec, read, 4, 10, 1e-3);
  t.equal(stepRoofline(spec, read, 4, 10, 1e-3, 1e-3).computeSeconds, same.computeSeconds, 'the expert peak defaults to the other one');
  const q4 = stepRoofline(spec, read, 4, 10, 1e-3, 2e-3);
  const experts = 4 * expertMacsPerToken(spec);
  const rest = 4 * macsPerToken(spec) - experts;
  t.ok(Math.abs(q4.computeSeconds - (rest / 1e6 + experts / 2e6)) < 1e-9 * q4.computeSeconds, 'other MACs at gmacs, expert MACs at expertGmacs');
  t.equal(q4.macs, same.macs, 'the MAC count does not change');
  t.ok(q4.tokensPerSecond > same.tokensPerSecond, 'a faster expert peak raises a compute-bound roofline');
});

t.test('stage-chain bound: each stage at its own larger cost, summed in data order', async (t) => {
  const gbps = 10;
  const gmacs = 1e-3; // 1 MMAC/s: every stage compute-bound
  const slow = stageChainBound(spec, 'q8_0', 4, gbps, gmacs);
  const byName = Object.fromEntries(slow.stages.map((s) => [s.name, s]));
  t.same(Object.keys(byName), ['embedding', 'qkv', 'o_proj', 'router', 'experts', 'lm_head']);
  // MACs per stage (4 tokens, 2 layers): q 64x64 + k, v 64x32 each; o 64x64; router 64x8;
  // 2 experts x 3 x 64x32 per token; LM head 1000x64.
  const mac = (m: number) => m / 1e6;
  t.ok(Math.abs(byName.qkv.seconds - mac(2 * 4 * 64 * (64 + 2 * 32))) < 1e-9);
  t.ok(Math.abs(byName.o_proj.seconds - mac(2 * 4 * 64 * 64)) < 1e-9);
  t.ok(Math.abs(byName.router.seconds - mac(2 * 4 * 64 * 8)) < 1e-9);
  t.ok(Math.abs(byName.experts.seconds - mac(2 * 4 * 2 * 3 * 64 * 32)) < 1e-9);
  t.ok(Math.abs(byName.lm_head.seconds - mac(4 * 1000 * 64)) < 1e-9);
  t.ok(slow.stages.every((s) => s.bound === (s.name === 'embedding' ? 'memory' : 'compute')));
  t.ok(Math.abs(slow.seconds - byName.embedding.seconds - mac(4 * macsPerToken(spec))) < 1e-9, 'all compute-bound: the MACs of a token x 4 at the peak');
  // Every stage memory-bound: the traffic of the step, the experts at the expected distinct count.
  const fast = stageChainBound(spec, 'q8_0', 4, gbps, 1e9);
  t.ok(fast.stages.every((s) => s.bound === 'memory'));
  const q8 = (rows: number, cols: number) => rows * rowBytes('q8_0', cols);
  const perExpert = 2 * q8(32, 64) + q8(64, 32);
  const read = bytesPerToken(spec, 'q8_0');
  const bytes = read.nonExpert + 3 * read.embedRow + 2 * expectedDistinct(8, 2, 4) * perExpert;
  t.ok(Math.abs(fast.seconds - bytes / 10e9) < 1e-12, 'all memory-bound: the weights the step reads at the bandwidth (those stepRoofline counts)');
  t.ok(Math.abs(fast.seconds - stepRoofline(spec, read, 4, gbps, 1e9).memorySeconds) < 1e-12);
  t.equal(fast.tokensPerSecond, 4 / fast.seconds);
  // A mixed step: the chain is never faster than the whole-step roofline (max over the step).
  for (const peak of [1e-3, 0.05, 1, 1e9]) {
    const chain = stageChainBound(spec, 'q8_0', 4, gbps, peak);
    const roof = stepRoofline(spec, bytesPerToken(spec, 'q8_0'), 4, gbps, peak);
    t.ok(chain.tokensPerSecond <= roof.tokensPerSecond * (1 + 1e-9), `peak ${peak}: chain ${chain.tokensPerSecond} <= roofline ${roof.tokensPerSecond}`);
  }
  // Q4_0 experts: their traffic in Q4_0 rows and their MACs at the experts' own peak.
  const q4 = stageChainBound(spec, 'q4_0', 4, gbps, gmacs, 2 * gmacs);
  const q4experts = q4.stages.find((s) => s.name === 'experts')!;
  t.ok(Math.abs(q4experts.seconds - byName.experts.seconds / 2) < 1e-9, 'the experts at twice the peak take half the time');
});

t.test('measured stages: the engine phase profile per step, in the stage chain\'s stages', async (t) => {
  // Milliseconds summed over 4 steps, as Engine::take_profile reports them.
  const profile = { embed: 0.4, qkv: 8, rope_kv: 1, attention: 2, o_proj: 4, router: 0.8, moe_prep: 0.4, gate_up: 40, act: 1.2, down: 20, combine: 0.8, lm_head: 12, later_phase: 0.4 };
  const got = measuredStages(profile, 4);
  t.same(
    got.map((s) => s.name),
    ['embedding', 'qkv', 'o_proj', 'router', 'experts', 'lm_head', 'other'],
    'the chain stages in data order, then what reads none of its weights',
  );
  const by = Object.fromEntries(got.map((s) => [s.name, s.ms]));
  t.ok(Math.abs(by.embedding - 0.1) < 1e-12);
  t.ok(Math.abs(by.qkv - 2) < 1e-12);
  t.ok(Math.abs(by.o_proj - 1) < 1e-12);
  t.ok(Math.abs(by.router - 0.2) < 1e-12);
  t.ok(Math.abs(by.experts - 15) < 1e-12, 'experts: gate_up and down');
  t.ok(Math.abs(by.lm_head - 3) < 1e-12);
  t.ok(Math.abs(by.other - (1 + 2 + 0.4 + 1.2 + 0.8 + 0.4) / 4) < 1e-12, 'other: rope_kv, attention, moe_prep, act, combine and unknown phases');
  const total = got.reduce((a, s) => a + s.ms, 0);
  t.ok(Math.abs(total - 91 / 4) < 1e-12, 'nothing lost or counted twice');
  // No profile (MOE_SERVE_PROFILE unset): zeros, and no division by zero steps.
  t.ok(measuredStages({}, 0).every((s) => s.ms === 0));
});
