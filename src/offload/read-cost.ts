// What the slow tier's reads cost the compute on this host, measured once when an
// offloading engine starts, and the prefetch threshold it implies.
//
// A prefetch reads an expert while layers compute. Where a read costs the CPU nothing
// (DMA from a local disk into pinned memory), a prefetch that is not used wastes only
// disk time. Where it does cost (a virtual disk served on the guest's own CPU budget, as
// on this project's machines: a decode-sized matmul ran at x0.50-0.63 of its speed while
// the store read), the compute slows by a fraction s for as long as the read is in
// flight. For an expert of load time t:
//   - used, the prefetch saves the demand wait t and costs s x t of compute: gain (1 - s) t;
//   - not used, it costs s x t and nothing else.
// With P the calibrated probability that the prefetch is used, it pays when
// P (1 - s) t > (1 - P) s t, that is when P > s. So the threshold is s, and never below
// the fixed floor that holds where reads are free (cache pollution, disk time).
// Measured in bench/offload-configs.ts here (forecast, lookahead 2, medians of 4 runs over
// on-demand LRU's speed): thresholds 0.3 / 0.45 / 0.6 gave x0.968 / x1.022 / x1.127; in
// another run 0.3 / auto (it measured 0.42-0.51) / 0.5 gave x0.975 / x1.014 / x1.015.
//
// The probe, three times (the median): a matmul of one expert's gate/up shape streamed
// from memory (kernelBench, the engine's thread count) timed alone, then while the store
// reads experts into the empty slots, enough of them to outlast the call at the read rate
// measured just before;
// s = (1 - rate while reading / rate alone), divided by the share of the timed window that
// reads were in flight for (the store's busy seconds tell). The slots are emptied again.

import { loadNative, type NativeEngine } from '../engine/native.js';
import type { ModelSpec } from '../model/spec.js';

/** Below this, a prefetch is not issued even where reads cost the compute nothing. */
export const PREFETCH_MIN_PROBABILITY_FLOOR = 0.3;
/** The auto threshold never goes above this (a prefetch at least this likely always pays). */
export const PREFETCH_MIN_PROBABILITY_CAP = 0.9;

export interface ReadCost {
  /** Fraction of its speed the compute loses while the slow tier reads, in [0, 1]. */
  slowdown: number;
  /** Matmul weight rate alone and while reading (GB/s). */
  quietGBs: number;
  readingGBs: number;
  /** The slow tier's read rate measured alone before the timed window (GB/s). */
  readGBs: number;
  /** Experts read during the timed window's fill. */
  expertsRead: number;
  /** Share of the timed window with reads in flight (the store's busy time); below 0.5 the slowdown is taken as 0. */
  coverage: number;
  /** Seconds the whole probe took. */
  seconds: number;
}

/** The prefetch threshold for a measured read cost: max(floor, slowdown), at most the cap. */
export function prefetchThreshold(cost: Pick<ReadCost, 'slowdown'>): number {
  const s = Number.isFinite(cost.slowdown) ? cost.slowdown : 0;
  return Math.min(PREFETCH_MIN_PROBABILITY_CAP, Math.max(PREFETCH_MIN_PROBABILITY_FLOOR, s));
}

const WINDOW_SECONDS = 0.15;
/** kernelBench's tail after its window (its prepare_acts timing). */
const PREPARE_TAIL_SECONDS = 0.02;
/** Reads requested last this many times a quiet call's wall time at the rate measured alone. */
const READ_COVER = 2;
/** Below this share of the window with reads in flight, the probe is inconclusive (slowdown 0). */
const MIN_COVERAGE = 0.5;
/** Quiet / reading pairs; the median pair's slowdown is taken. */
const PAIRS = 3;
/**
 * The matmul cycles over this many bytes of weight copies: well past the last-level
 * cache, as decode streams the experts. With 64 MB it partly ran from cache here (25.6
 * GB/s alone, x0.62 while reading, where bench:offload's 512 MB gave 21 GB/s and x0.535).
 */
const PROBE_MATMUL_BYTES = 256 << 20;
const BANDWIDTH_EXPERTS = 8;

/** What the probe needs of an offloading engine. */
export type ProbeEngine = Pick<NativeEngine, 'loadExpert' | 'waitExpert' | 'evictSlot' | 'storeStats'> & { info(): { expertBytes: number } };

/**
 * Measures ReadCost on an offloading engine whose slots are all empty (a fresh one); the
 * slots are empty again when it returns. `format` is the experts' weight type.
 */
export function measureReadCost(engine: ProbeEngine, spec: ModelSpec, slots: readonly number[], format: 'q8_0' | 'q4_0' | 'bf16' | 'f16' | 'f32', threads: number): ReadCost {
  const t0 = performance.now();
  const native = loadNative();
  const rows = 2 * spec.expertIntermediateSize;
  const cols = spec.hiddenSize;
  // One kernelBench call: its setup (the weight copies), then the timed window, then a short
  // tail (PREPARE_TAIL_SECONDS); wall seconds and the window's own seconds.
  const timed = () => {
    const w0 = performance.now();
    const r = native.kernelBench(format, rows, cols, 1, threads, PROBE_MATMUL_BYTES, WINDOW_SECONDS);
    return { gbs: r.bytesPerCall / r.seconds / 1e9, window: r.calls * r.seconds, wall: (performance.now() - w0) / 1000 };
  };
  // Every (layer, slot) once, layers interleaved, each slot holding a distinct expert of its layer.
  const order: { layer: number; slot: number }[] = [];
  const maxSlots = Math.max(...slots);
  for (let s = 0; s < maxSlots; s++) for (let l = 0; l < slots.length; l++) if (s < slots[l]) order.push({ layer: l, slot: s });
  const expertOf = (i: number) => order[i].slot % spec.numExperts;
  const fill = (n: number) => {
    for (let i = 0; i < n; i++) engine.loadExpert(order[i].layer, expertOf(i), order[i].slot);
  };
  const wait = (n: number) => {
    for (let i = 0; i < n; i++) engine.waitExpert(order[i].layer, expertOf(i));
  };
  const evict = (n: number) => {
    for (let i = 0; i < n; i++) engine.evictSlot(order[i].layer, order[i].slot);
  };
  const stats = () => engine.storeStats();

  // The read rate alone, from a few experts.
  const nb = Math.min(BANDWIDTH_EXPERTS, order.length);
  const s0 = stats();
  const tb = performance.now();
  fill(nb);
  wait(nb);
  const readGBs = (stats().bytesRead - s0.bytesRead) / Math.max(1e-6, (performance.now() - tb) / 1000) / 1e9;
  evict(nb);
  const perExpert = engine.info().expertBytes;
  // PAIRS alternations of a quiet call and one under reads; the median pair decides.
  const pairs: { quiet: number; reading: number; coverage: number; k: number }[] = [];
  for (let p = 0; p < PAIRS; p++) {
    const quiet = timed();
    // Enough reads, started just before the call, to outlast its setup and its window.
    const want = Math.ceil((READ_COVER * quiet.wall * readGBs * 1e9) / Math.max(1, perExpert));
    const k = Math.max(1, Math.min(order.length, want));
    const s1 = stats();
    fill(k);
    const reading = timed();
    // Busy seconds once every read is done (a read still in flight is not counted yet).
    wait(k);
    const busy = (stats().busySeconds ?? 0) - (s1.busySeconds ?? 0);
    evict(k);
    // Reads ran from the call's start for `busy` seconds (the store reads back to back); the
    // window is the call's [wall - tail - window, wall - tail]. Its share with reads in flight:
    const windowStart = reading.wall - PREPARE_TAIL_SECONDS - reading.window;
    const coverage = reading.window > 0 ? Math.min(1, Math.max(0, busy - windowStart) / reading.window) : 0;
    pairs.push({ quiet: quiet.gbs, reading: reading.gbs, coverage, k });
  }
  // Too little overlap says nothing; otherwise the loss scaled to reads in flight all along.
  const lossOf = (x: (typeof pairs)[number]) => (x.coverage >= MIN_COVERAGE && x.quiet > 0 ? Math.min(1, Math.max(0, (1 - x.reading / x.quiet) / x.coverage)) : 0);
  const med = [...pairs].sort((a, b) => lossOf(a) - lossOf(b))[pairs.length >> 1];
  const slowdown = lossOf(med);
  const coverage = med.coverage;
  const quietGBs = med.quiet;
  const readingGBs = med.reading;
  const k = med.k;
  return { slowdown, coverage, quietGBs, readingGBs, readGBs, expertsRead: k, seconds: (performance.now() - t0) / 1000 };
}
