// Matrix-kernel benchmark: `npx tsx bench/kernels.ts` (about two minutes on 2 cores).
//
// Decode (n <= 8) is memory-bound: its figure is the effective bandwidth of weight
// traffic (weight bytes / time per call) against a streaming-read probe measured in the
// same run with the same threads and the same pool. Each matmul cycles over distinct
// copies of the matrix (>= 256 MB together, like the experts of a layer) so that the
// caches do not help. Prefill (n >= 32) is compute-bound: its figure is GMAC/s, against
// the int8 MAC peak measured in the same run (macPeakBench: the active ISA's int8
// dot-product instructions on registers, the best of a few short runs; float weights are
// held against it too; Q4_0 from 6 tokens on against the probe of its token-group mix,
// which on AVX2 needs a quarter of the vpmaddwd). A shared VM's speed drifts over minutes:
// a kernel can still land above a peak measured in a slow spell.
//
// Options (environment): BENCH_THREADS (default 2), BENCH_SECONDS per figure (default 0.4),
// BENCH_CASES: only these cases, e.g. `q8_0:151936x2048:32,q8_0:4096x2048:16` (A/B runs of
// one kernel without the two minutes of the full table).
// The last line is JSON: [{name, value, unit, compared_to}].
import { loadNative, type WeightType } from '../src/engine/native.js';
import { probeMacPeak } from './lib/engine-bench-common.js';
import type { Figure } from './lib/figures.js';

const MB = 1 << 20;
const threads = Number(process.env.BENCH_THREADS ?? 2);
const seconds = Number(process.env.BENCH_SECONDS ?? 0.4);
const addon = loadNative();
const info = addon.kernelInfo();
const figures: Figure[] = [];
const round = (v: number, digits = 2) => Number(v.toFixed(digits));

console.log(
  `kernels: isa=${info.active} (best ${info.best}, vnni ${info.vnni}, bf16 ${info.bf16}, amx ${info.amx}: ${info.amxStatus}), threads=${threads}`,
);

// The probe: a plain streaming read of a 512 MB buffer, split over the pool's threads.
const probe = addon.streamBench(512 * MB, threads, 1.0);
const probeGBs = probe.bytes / probe.seconds / 1e9;
const probe1 = addon.streamBench(512 * MB, 1, 0.5);
const probe1GBs = probe1.bytes / probe1.seconds / 1e9;
console.log(`stream-read probe: ${probeGBs.toFixed(1)} GB/s with ${threads} threads, ${probe1GBs.toFixed(1)} GB/s with 1`);
// The compute probe: the int8 dot-product instructions of the active ISA on registers.
const peakGMACs = probeMacPeak(threads);
// Q4_0's token groups (6 tokens and more) have an instruction mix of their own on AVX2
// (four vpmaddubsw per vpmaddwd) that can pass the Q8_0 peak: their lines use this one.
const peakQ4GMACs = probeMacPeak(threads, 'q4_0');
console.log(`int8 MAC peak: ${peakGMACs.toFixed(1)} GMAC/s with ${threads} threads (the ${info.active} kernels' int8 dot product without weight traffic); Q4_0 token-group mix ${peakQ4GMACs.toFixed(1)} GMAC/s`);
figures.push({ name: `int8 MAC peak, ${threads} threads`, value: round(peakGMACs), unit: 'GMAC/s', compared_to: null });
figures.push({ name: `int8 MAC peak, Q4_0 token-group mix, ${threads} threads`, value: round(peakQ4GMACs), unit: 'GMAC/s', compared_to: null });
/** The peak a case's compute is held against: Q4_0 from 6 tokens on (token groups) has its own. */
const peakFor = (type: WeightType, n: number) => (type === 'q4_0' && n >= 6 ? peakQ4GMACs : peakGMACs);
figures.push({ name: `stream-read probe, ${threads} threads`, value: round(probeGBs), unit: 'GB/s', compared_to: null });
figures.push({ name: 'stream-read probe, 1 thread', value: round(probe1GBs), unit: 'GB/s', compared_to: null });

const types: WeightType[] = ['q8_0', 'q4_0', 'bf16'];
const shapes: [number, number][] = [
  [768, 2048],
  [2048, 768],
  [4096, 2048],
];
// 2 and 4: the tokens per expert of batched decode (32 sequences, top-8 of 128 experts: ~2).
const ns = [1, 2, 4, 8, 32, 512];

function run(type: WeightType, rows: number, cols: number, n: number): void {
  // Decode cycles over >= 256 MB of copies; prefill is compute-bound, 64 MB is plenty.
  const minBytes = n <= 8 ? 256 * MB : 64 * MB;
  const r = addon.kernelBench(type, rows, cols, n, threads, minBytes, seconds);
  const gbs = r.bytesPerCall / r.seconds / 1e9;
  const gmacs = (rows * cols * n) / r.seconds / 1e9;
  const label = `${type} ${rows}x${cols} n=${n}`;
  const frac = gbs / probeGBs;
  console.log(
    `${label.padEnd(26)} ${(r.seconds * 1e6).toFixed(1).padStart(9)} us  ${gbs.toFixed(1).padStart(6)} GB/s` +
      ` (${(100 * frac).toFixed(0).padStart(3)}% of probe)  ${gmacs.toFixed(1).padStart(7)} GMAC/s` +
      ` (${((100 * gmacs) / peakFor(type, n)).toFixed(0).padStart(3)}% of peak)  prepare ${(r.prepareSeconds * 1e6).toFixed(1)} us`,
  );
  if (n <= 8) {
    figures.push({
      name: `${label} weight traffic`,
      value: round(gbs),
      unit: 'GB/s',
      compared_to: `stream-read probe ${probeGBs.toFixed(1)} GB/s: ${(100 * frac).toFixed(1)}%`,
    });
  } else {
    figures.push({
      name: `${label} throughput`,
      value: round(gmacs),
      unit: 'GMAC/s',
      compared_to: `int8 MAC peak${peakFor(type, n) !== peakGMACs ? ' (Q4_0 token-group mix)' : ''} ${peakFor(type, n).toFixed(1)} GMAC/s: ${((100 * gmacs) / peakFor(type, n)).toFixed(1)}% (weight traffic ${gbs.toFixed(1)} GB/s = ${(100 * frac).toFixed(1)}% of probe)`,
    });
  }
}

const only = (process.env.BENCH_CASES ?? '').split(',').filter((c) => c.length > 0);
if (only.length > 0) {
  for (const c of only) {
    const [type, shape, n] = c.split(':');
    const [rows, cols] = shape.split('x').map(Number);
    run(type as WeightType, rows, cols, Number(n));
  }
} else {
  for (const type of types) {
    for (const [rows, cols] of shapes) for (const n of ns) run(type, rows, cols, n);
    run(type, 151936, 2048, 1);
  }
  // Batched decode's compute-bound matmuls: the LM head and the attention projections
  // with 16 and 32 tokens (one token per sequence).
  for (const n of [16, 32]) {
    run('q8_0', 151936, 2048, n);
    run('q8_0', 4096, 2048, n);
  }
}

// The peak again: the percentages above use the first one; a much higher second one means
// the machine was in a slow spell at the start.
const peakAfter = probeMacPeak(threads);
console.log(`int8 MAC peak after the kernels: ${peakAfter.toFixed(1)} GMAC/s (before: ${peakGMACs.toFixed(1)})`);
figures.push({ name: `int8 MAC peak after the kernels, ${threads} threads`, value: round(peakAfter), unit: 'GMAC/s', compared_to: `before the kernels ${peakGMACs.toFixed(1)} GMAC/s` });
console.log(JSON.stringify(figures));
