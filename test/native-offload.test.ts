// The native tiered expert store: an engine with offloaded experts (expert file + a few
// slots per layer, loads on I/O threads) gives logits bit for bit equal to the all-resident
// engine, whatever the loading order; load / cancel / evict / wait semantics and their
// counters; errors instead of crashes; the expert file never stays on disk; and the
// pre-gating router projection against a plain TypeScript computation.

import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { openModel } from '../src/model/checkpoint.js';
import { ReferenceModel } from '../src/model/reference.js';
import type { SafetensorsCheckpoint } from '../src/model/safetensors.js';
import type { Architecture, ModelSpec } from '../src/model/spec.js';
import { EMBED, FINAL_NORM, LM_HEAD, layerNames } from '../src/model/tensor-names.js';
import { loadNative, type NativeEngine, type NativeEngineOptions, type NativeOffloadOptions } from '../src/engine/native.js';
import { argmax } from '../src/engine/sampling.js';
import { engineOptions as runnerEngineOptions } from '../src/engine/native-runner.js';
import { Rng } from '../src/model/prng.js';
import { topKIds } from '../src/offload/prediction.js';
import { relMaxError, tempDir, writeModel } from './helpers/models.js';

type Tap = { teardown(fn: () => void): void; fail(message: string): unknown };
type Weights = 'f32' | 'q8_0';

const BLOCK = 16;
const BLOCKS_PER_SEQ = 8; // 128 positions per sequence

function engineOptions(spec: ModelSpec, weights: Weights, kvBlocks: number, offload?: NativeOffloadOptions): NativeEngineOptions {
  const format = weights === 'q8_0' ? 'q8' : 'f32';
  return { ...runnerEngineOptions(spec, { weights: format, threads: 2, kvBlockSize: BLOCK, kvBlocks }), offload };
}

/** Every tensor of the checkpoint to the engine under its role, as the runner does. */
function loadTensors(e: NativeEngine, spec: ModelSpec, ckpt: SafetensorsCheckpoint): void {
  const put = (role: string, layer: number, expert: number, name: string) => {
    const info = ckpt.info(name);
    const rows = info.shape.length === 1 ? 1 : info.shape[0];
    e.setTensor(role, layer, expert, ckpt.bytes(name), info.dtype, rows, info.shape[info.shape.length - 1]);
  };
  put('embed', -1, 0, EMBED);
  put('final_norm', -1, 0, FINAL_NORM);
  if (!spec.tieWordEmbeddings) put('lm_head', -1, 0, LM_HEAD);
  for (let l = 0; l < spec.numLayers; l++) {
    const n = layerNames(spec, l);
    put('input_norm', l, 0, n.inputNorm);
    put('post_norm', l, 0, n.postAttnNorm);
    for (const [role, name] of [['q', n.q], ['k', n.k], ['v', n.v], ['o', n.o]] as const) put(role, l, 0, name);
    if (n.qBias && n.kBias && n.vBias) {
      put('q_bias', l, 0, n.qBias);
      put('k_bias', l, 0, n.kBias);
      put('v_bias', l, 0, n.vBias);
    }
    if (n.qNorm && n.kNorm) {
      put('q_norm', l, 0, n.qNorm);
      put('k_norm', l, 0, n.kNorm);
    }
    put('router', l, 0, n.router);
    // Experts in a scrambled order, parts interleaved across experts: the store must
    // assemble each expert from its three parts whatever order they come in.
    const order = Array.from({ length: spec.numExperts }, (_, j) => (j * 5 + 3) % spec.numExperts);
    for (const j of order) put('down', l, j, n.expert(j).down);
    for (const j of order) put('gate', l, j, n.expert(j).gate);
    for (const j of order) put('up', l, j, n.expert(j).up);
    if (n.shared) {
      put('gate', l, -1, n.shared.gate);
      put('up', l, -1, n.shared.up);
      put('down', l, -1, n.shared.down);
      put('shared_gate_scalar', l, 0, n.shared.gateScalar);
    }
  }
}

interface Fixture {
  spec: ModelSpec;
  ckpt: SafetensorsCheckpoint;
  vocabLimit: number;
  dir: string;
  make(weights: Weights, offload?: Omit<NativeOffloadOptions, 'file'> & { file?: string }): { engine: NativeEngine; file: string };
}

async function fixture(t: Tap, arch: Architecture, overrides: Partial<ModelSpec> = {}, kvBlocks = 6 * BLOCKS_PER_SEQ): Promise<Fixture> {
  const modelDir = writeModel(t, { arch, seed: 7, overrides });
  const m = await openModel(modelDir);
  t.teardown(() => m.close());
  const dir = tempDir(t, 'moe-offload-');
  let n = 0;
  const { NativeEngine } = loadNative();
  return {
    spec: m.spec,
    ckpt: m.weights,
    vocabLimit: m.tokenizer.vocabSize,
    dir,
    make(weights, offload) {
      const file = offload?.file ?? path.join(dir, `experts-${n++}.bin`);
      const engine = new NativeEngine(engineOptions(m.spec, weights, kvBlocks, offload ? { ...offload, file } : undefined));
      t.teardown(() => engine.close());
      loadTensors(engine, m.spec, m.weights);
      engine.finalize();
      return { engine, file };
    },
  };
}

/** A sequence's share of a step: its new tokens, its start position and its KV blocks. */
interface Part {
  tokens: number[];
  start: number;
  blocks: number[];
}

function packParts(parts: Part[]): { tokens: Int32Array; seqs: Int32Array; blocks: Int32Array } {
  const tokens = Int32Array.from(parts.flatMap((p) => p.tokens));
  const seqs = Int32Array.from(parts.flatMap((p) => [p.start, p.tokens.length, 1, p.blocks.length]));
  const blocks = Int32Array.from(parts.flatMap((p) => p.blocks));
  return { tokens, seqs, blocks };
}

function bytesOf(a: Float32Array | Int32Array | Float64Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

function sameBits(a: Float32Array, b: Float32Array): boolean {
  return a.length === b.length && Buffer.compare(bytesOf(a), bytesOf(b)) === 0;
}

function distinct(ids: Int32Array): number[] {
  const out: number[] = [];
  for (const e of ids) if (!out.includes(e)) out.push(e);
  return out;
}

/**
 * The test's own record of which expert it put in which slot (loads, evictions and
 * successful cancels decide it, never I/O timing), and a simple on-demand policy.
 */
class SlotMirror {
  readonly occ: Int32Array[];
  /** Slots of each layer. */
  readonly slots: readonly number[];
  loadsIssued = 0;
  constructor(
    readonly e: NativeEngine,
    layers: number,
    slots: number | readonly number[],
  ) {
    this.slots = typeof slots === 'number' ? new Array<number>(layers).fill(slots) : [...slots];
    this.occ = this.slots.map((n) => new Int32Array(n).fill(-1));
  }
  slotOf(l: number, expert: number): number {
    return this.occ[l].indexOf(expert);
  }
  load(l: number, expert: number, slot: number): void {
    this.e.loadExpert(l, expert, slot);
    if (this.occ[l][slot] !== expert) this.loadsIssued++;
    this.occ[l][slot] = expert;
  }
  evict(l: number, slot: number): void {
    this.e.evictSlot(l, slot);
    this.occ[l][slot] = -1;
  }
  cancel(l: number, expert: number): boolean {
    const ok = this.e.cancelLoad(l, expert);
    if (ok) this.occ[l][this.slotOf(l, expert)] = -1;
    return ok;
  }
  /** Loads every expert of `want` (at most the layer's slots of them) not already in a slot, into slots holding none of them. */
  ensure(l: number, want: number[]): void {
    for (const x of want) {
      if (this.slotOf(l, x) >= 0) continue;
      let s = this.occ[l].indexOf(-1);
      if (s < 0) s = this.occ[l].findIndex((o) => !want.includes(o));
      if (s < 0) throw new Error('no free slot');
      this.load(l, x, s);
    }
  }
}

/**
 * One step of the resident engine (the model's own routing) and the same step on the
 * offloading engine, whose experts are loaded on demand; when a layer needs more experts
 * than it has slots, they stream through the slots in parts. Returns both logits.
 */
function twinStep(
  t: Tap,
  spec: ModelSpec,
  res: NativeEngine,
  off: NativeEngine,
  mirror: SlotMirror,
  parts: Part[],
  evictAfter: boolean,
): { a: Float32Array; b: Float32Array; streamed: number } {
  const { tokens, seqs, blocks } = packParts(parts);
  const T = tokens.length;
  res.beginStep(tokens, seqs, blocks);
  off.beginStep(tokens, seqs, blocks);
  let streamed = 0;
  for (let l = 0; l < spec.numLayers; l++) {
    const ra = res.attention(l);
    const rb = off.attention(l);
    if (!sameBits(ra, rb)) t.fail(`router logits of layer ${l} differ`);
    const r = res.route(ra, T);
    res.experts(l, r.ids, r.weights, spec.topK);
    const need = distinct(r.ids);
    const C = mirror.slots[l];
    if (need.length <= C) {
      mirror.ensure(l, need);
      off.experts(l, r.ids, r.weights, spec.topK);
    } else {
      streamed++;
      for (let i = 0; i < need.length; i += C) {
        const chunk = need.slice(i, i + C);
        mirror.ensure(l, chunk);
        const expect = need.length - Math.min(need.length, i + C);
        if (expect === 0 && l % 2 === 0) {
          off.experts(l, r.ids, r.weights, spec.topK); // the rest, without naming them
        } else {
          const left = off.expertsPart(l, r.ids, r.weights, spec.topK, Int32Array.from(chunk));
          if (left !== expect) t.fail(`streaming layer ${l}: ${left} experts left, expected ${expect}`);
        }
      }
    }
    if (evictAfter) for (let s = 0; s < C; s++) mirror.evict(l, s);
  }
  return { a: res.endStep(), b: off.endStep(), streamed };
}

const TWIN_CASES: { arch: Architecture; weights: Weights; slots: number | number[] }[] = [
  { arch: 'qwen2_moe', weights: 'q8_0', slots: 3 }, // shared expert; every step streams (k = 4 > 3 slots)
  { arch: 'qwen2_moe', weights: 'f32', slots: 5 },
  { arch: 'mixtral', weights: 'q8_0', slots: 4 }, // decode of one sequence fits (k = 2)
  { arch: 'mixtral', weights: 'f32', slots: 2 },
  // Unequal splits: layer 0 streams every step while layer 1 mostly fits, and the reverse.
  { arch: 'qwen2_moe', weights: 'q8_0', slots: [2, 11] },
  { arch: 'mixtral', weights: 'f32', slots: [6, 1] },
];

for (const { arch, weights, slots } of TWIN_CASES) {
  const label = typeof slots === 'number' ? `${slots} slots per layer` : `slots ${slots.join(', ')} by layer`;
  t.test(`${arch} ${weights}, ${label}: offloaded logits equal the resident engine bit for bit`, async (t) => {
    const fx = await fixture(t, arch);
    const spec = fx.spec;
    const { engine: res } = fx.make(weights);
    const { engine: off } = fx.make(weights, { slotsPerLayer: slots, ioThreads: 2 });
    t.equal(res.info().offload, false);
    t.equal(off.info().offload, true);
    const st0 = off.storeStats();
    t.equal(st0.slotBytes % 4096, 0);
    t.ok(st0.slotBytes >= off.info().expertBytes && st0.slotBytes - off.info().expertBytes < 4096);
    // Routed experts are not resident: the slot arena is counted instead.
    const expertsTotal = spec.numLayers * spec.numExperts * res.info().expertBytes;
    const totalSlots = typeof slots === 'number' ? spec.numLayers * slots : slots.reduce((a, n) => a + n, 0);
    t.equal(off.info().weightBytes, res.info().weightBytes - expertsTotal + totalSlots * st0.slotBytes, 'each layer\'s arena holds its own slots');

    const rng = new Rng(17);
    const seqTokens = [7, 19, 4].map((n) => Array.from({ length: n }, () => rng.u32() % fx.vocabLimit));
    const seqBlocks = seqTokens.map((_, i) => Array.from({ length: BLOCKS_PER_SEQ }, (_, j) => i * BLOCKS_PER_SEQ + j));
    const done = seqTokens.map(() => 0);
    const mirror = new SlotMirror(off, spec.numLayers, slots);
    let streamed = 0;
    let equal = 0;
    const steps = 8;
    for (let step = 0; step < steps; step++) {
      // Prefill of all three, decode of all three, then decode of the first one alone.
      const members = step < 5 ? [0, 1, 2] : [0];
      const parts = members.map((i) => ({ tokens: seqTokens[i].slice(done[i]), start: done[i], blocks: seqBlocks[i] }));
      const out = twinStep(t, spec, res, off, mirror, parts, step % 2 === 1);
      streamed += out.streamed;
      if (sameBits(out.a, out.b)) equal++;
      else t.fail(`step ${step}: logits differ (max relative error ${relMaxError(out.a, out.b)})`);
      members.forEach((i, row) => {
        done[i] = seqTokens[i].length;
        seqTokens[i].push(argmax(out.a.subarray(row * spec.vocabSize, (row + 1) * spec.vocabSize), 0, fx.vocabLimit));
      });
    }
    t.equal(equal, steps, 'every step bitwise equal');
    t.ok(streamed > 0, `some layers streamed their experts through the slots (${streamed})`);
    const st = off.storeStats();
    t.equal(st.loads, mirror.loadsIssued, 'one completed read per load issued');
    t.equal(st.bytesRead, st.loads * st.slotBytes);
    t.equal(st.cancelled, 0);
    t.equal(st.failed, 0);
    t.equal(st.stallSeconds.length, spec.numLayers);
    // Busy time is the union of the reads' intervals: positive, and at most their sum.
    t.ok(st.busySeconds! > 0 && st.busySeconds! <= st.readSeconds! * (1 + 1e-9), `read busy ${st.busySeconds} s, sum of reads ${st.readSeconds} s`);
    t.comment(`${arch} ${weights}: ${st.loads} loads, direct=${st.direct}, stall per layer ${Array.from(st.stallSeconds, (s) => s.toExponential(1)).join(' ')}`);
  });
}

t.test('the expert file is unlinked at once and its descriptors close with the engine', async (t) => {
  const fx = await fixture(t, 'mixtral');
  const fdsTo = (file: string) =>
    fs.readdirSync('/proc/self/fd').filter((fd) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${fd}`).startsWith(file);
      } catch {
        return false;
      }
    });
  const { engine, file } = fx.make('q8_0', { slotsPerLayer: 2 });
  t.notOk(fs.existsSync(file), 'no expert file on disk while the engine runs');
  t.same(fs.readdirSync(fx.dir), [], 'nothing else left in its directory');
  t.equal(fdsTo(file).length, 2, 'two descriptors (writes, reads) on the deleted file');
  engine.close();
  t.equal(fdsTo(file).length, 0, 'close() closes them');
  t.throws(() => engine.storeStats(), /closed/);

  // A path that exists is refused, and the existing file is left alone.
  const existing = path.join(fx.dir, 'taken.bin');
  fs.writeFileSync(existing, 'keep me');
  t.throws(() => fx.make('q8_0', { slotsPerLayer: 2, file: existing }), /already exists/);
  t.equal(fs.readFileSync(existing, 'utf8'), 'keep me');
});

t.test('direct reads where the file system allows them, buffered ones otherwise', async (t) => {
  const fx = await fixture(t, 'mixtral');
  const { engine: buffered } = fx.make('q8_0', { slotsPerLayer: 2, direct: false });
  t.equal(buffered.storeStats().direct, false, 'direct: false is honoured');
  const { engine: dflt } = fx.make('q8_0', { slotsPerLayer: 2 });
  t.comment(`default on ${fx.dir}: direct=${dflt.storeStats().direct}`);
  if (fs.existsSync('/dev/shm') && fs.statSync('/dev/shm').isDirectory()) {
    const file = path.join('/dev/shm', `moe-offload-test-${process.pid}-${Date.now()}.bin`);
    const { engine: shm } = fx.make('q8_0', { slotsPerLayer: 2, file });
    t.notOk(fs.existsSync(file));
    // tmpfs refuses O_DIRECT before Linux 6.6 (the engine then falls back to buffered
    // reads) and accepts it since; either way loads work.
    t.comment(`/dev/shm (tmpfs): direct=${shm.storeStats().direct}`);
    shm.loadExpert(0, 1, 0);
    shm.waitExpert(0, 1);
    t.equal(shm.expertState(0, 1), 3);
  }
  // Either way the loads work and read whole slots.
  for (const e of [buffered, dflt]) {
    e.loadExpert(1, 7, 1);
    t.ok(e.waitExpert(1, 7) >= 0);
    t.equal(e.storeStats().bytesRead, e.storeStats().slotBytes);
  }
});

t.test('load, cancel, evict and state transitions', async (t) => {
  const fx = await fixture(t, 'olmoe');
  const E = fx.spec.numExperts;
  const { engine: e } = fx.make('q8_0', { slotsPerLayer: E, ioThreads: 1 });
  t.same(Array.from({ length: E }, (_, x) => e.expertState(0, x)), new Array(E).fill(0), 'every expert absent at first');
  e.loadExpert(0, 5, 0);
  t.ok([1, 2, 3].includes(e.expertState(0, 5)), 'queued, reading or resident right after loadExpert');
  t.ok(e.waitExpert(0, 5) >= 0);
  t.equal(e.expertState(0, 5), 3);
  t.equal(e.waitExpert(0, 5), 0, 'no wait for a resident expert');
  e.loadExpert(0, 5, 0); // already there: nothing happens
  t.equal(e.storeStats().loads, 1);
  t.throws(() => e.loadExpert(0, 5, 1), /already in slot 0/);
  t.equal(e.cancelLoad(0, 5), false, 'a resident expert has no load to cancel');
  t.equal(e.cancelLoad(0, 6), false, 'nor an absent one');
  t.equal(e.expertState(1, 5), 0, 'layers are separate');

  // Loading another expert into the slot drops the one it held.
  e.loadExpert(0, 6, 0);
  t.equal(e.expertState(0, 5), 0);
  e.waitExpert(0, 6);
  e.evictSlot(0, 0);
  t.equal(e.expertState(0, 6), 0);
  t.throws(() => e.waitExpert(0, 6), /neither resident nor loading/);
  e.evictSlot(0, 0); // evicting an empty slot is fine

  // Cancelling queued loads: one I/O thread and many loads queued at once, so the last
  // ones have not started when they are cancelled (each outcome is checked either way).
  let cancelled = 0;
  const before = e.storeStats();
  for (let x = 0; x < E; x++) e.loadExpert(1, x, x);
  for (let x = E - 1; x >= 0; x--) {
    const ok = e.cancelLoad(1, x);
    const s = e.expertState(1, x);
    if (ok) {
      cancelled++;
      if (s !== 0) t.fail(`cancelled ${x} is in state ${s}`);
    } else if (![2, 3].includes(s)) {
      t.fail(`cancelLoad(1, ${x}) false but state ${s}`);
    }
  }
  t.ok(cancelled > 0, `${cancelled} of ${E} loads cancelled before they started`);
  for (let x = 0; x < E; x++) if (e.expertState(1, x) !== 0) e.waitExpert(1, x);
  const after = e.storeStats();
  t.equal(after.cancelled - before.cancelled, cancelled);
  t.equal(after.loads - before.loads, E - cancelled, 'every load not cancelled was read');

  // Evicting a slot while its read may be in flight: the read is discarded, never torn.
  const d0 = e.storeStats();
  for (let x = 0; x < 8; x++) e.loadExpert(0, x + 10, x + 10);
  for (let x = 0; x < 8; x++) e.evictSlot(0, x + 10);
  t.same(Array.from({ length: 8 }, (_, x) => e.expertState(0, x + 10)), new Array(8).fill(0), 'evicted experts are absent at once');
  for (let x = 0; x < 8; x++) e.loadExpert(0, x + 10, x + 10);
  for (let x = 0; x < 8; x++) e.waitExpert(0, x + 10);
  const d1 = e.storeStats();
  t.equal(d1.loads - d0.loads + (d1.cancelled - d0.cancelled), 16, 'each of the 16 loads was either read or withdrawn');
  t.ok(d1.discarded! - d0.discarded! <= d1.loads - d0.loads - 8, 'discarded reads are among the reads');
});

t.test('queued loads start by priority (demand first), FIFO within a priority', async (t) => {
  const fx = await fixture(t, 'olmoe');
  const E = fx.spec.numExperts;
  const { engine: e } = fx.make('q8_0', { slotsPerLayer: E, ioThreads: 1 });
  // The gate lets exactly one queued read start at a time, so the order is observable.
  const next = (): number[] => {
    const before = e.storeStats().loads;
    e.gateLoads(1);
    for (let spin = 0; e.storeStats().loads === before; spin++) if (spin > 1e8) throw new Error('no read started');
    const resident: number[] = [];
    for (let l = 0; l < 2; l++) for (let x = 0; x < E; x++) if (e.expertState(l, x) === 3) resident.push(l * E + x);
    return resident;
  };
  e.gateLoads(0);
  e.loadExpert(1, 0, 0, 1); // prefetches of layer 1
  e.loadExpert(1, 1, 1, 1);
  e.loadExpert(1, 2, 2, 2); // a less urgent one
  e.loadExpert(0, 3, 3); // demand (default priority 0)
  e.loadExpert(1, 4, 4, 1);
  e.loadExpert(0, 5, 5, 0);
  t.throws(() => e.loadExpert(0, 6, 6, -1), /priority/);
  t.same([0, 1, 2, 3, 4, 5].map((x) => e.expertState(x === 3 || x === 5 ? 0 : 1, x)), [1, 1, 1, 1, 1, 1], 'all queued behind the gate');
  const order: number[] = [];
  let seen = new Set<number>();
  const step = () => {
    const now = next();
    const added = now.filter((i) => !seen.has(i));
    t.equal(added.length, 1, 'one read per opening of the gate');
    order.push(added[0] % E);
    seen = new Set(now);
  };
  step();
  step();
  t.same(order, [3, 5], 'demand loads first, in the order queued');
  // Loading a queued prefetch again with demand priority raises it.
  e.loadExpert(1, 4, 4, 0);
  step();
  t.same(order, [3, 5, 4]);
  step();
  step();
  t.same(order, [3, 5, 4, 0, 1], 'then the prefetches of priority 1, FIFO');
  step();
  t.same(order, [3, 5, 4, 0, 1, 2], 'the least urgent last');
  t.equal(e.storeStats().loads, 6);

  // A demand load never waits behind queued prefetches on the I/O thread, only behind a read in flight.
  e.gateLoads(-1);
  for (let x = 0; x < 6; x++) e.evictSlot(x === 3 || x === 5 ? 0 : 1, x);
  e.gateLoads(0);
  for (let x = 0; x < 16; x++) e.loadExpert(1, x, x, 1);
  e.loadExpert(0, 20, 0);
  e.gateLoads(1);
  e.waitExpert(0, 20);
  t.equal(e.expertState(1, 0), 1, 'the first prefetch is still queued after the demand load');
  e.gateLoads(-1);
  for (let x = 0; x < 16; x++) e.waitExpert(1, x);
  t.equal(e.storeStats().loads, 6 + 17);
});

t.test('background reads yield to demand reads, stop when their slot is taken, and never hold up experts()', async (t) => {
  // Prefetch-like loads (priority 1 and 2) queued or reading when experts() needs them
  // (raised to demand, or marked as waited for), others evicted or replaced while they
  // read, demand loads beside them: every step completes (a lost wake-up here once left a
  // paused background read waiting for a demand read that no thread was told to start)
  // and the logits stay bitwise the resident engine's.
  const fx = await fixture(t, 'qwen2_moe');
  const spec = fx.spec;
  const L = spec.numLayers;
  const E = spec.numExperts;
  const slots = 10;
  const { engine: res } = fx.make('q8_0');
  const { engine: off } = fx.make('q8_0', { slotsPerLayer: slots, ioThreads: 2 });
  t.ok(2 * spec.topK <= slots, 'a step of two tokens fits its layer slots');
  // Slow reads (as of experts megabytes in size), so that background reads are still in
  // flight, and pause, when the demand loads and experts() come.
  off.throttleLoads(0.3);
  const occ = Array.from({ length: L }, () => new Int32Array(slots).fill(-1));
  const rng = new Rng(2024);
  const before = off.storeStats();
  let issued = 0;
  let exact = 0;
  const STEPS = 80;
  for (let step = 0; step < STEPS; step++) {
    const tokens = [1 + (step % 7), 30 + step].map((x) => x % fx.vocabLimit);
    const { tokens: tk, seqs, blocks } = packParts([{ tokens, start: 0, blocks: [0] }]);
    res.beginStep(tk, seqs, blocks);
    off.beginStep(tk, seqs, blocks);
    for (let l = 0; l < L; l++) {
      const ra = res.attention(l);
      off.attention(l);
      const r = res.route(ra, tokens.length);
      res.experts(l, r.ids, r.weights, spec.topK);
      const need = distinct(r.ids);
      // Background loads: some of the needed experts, and others that the demand loads
      // below may displace while they are still being read.
      const load = (x: number, s: number, priority: number) => {
        off.loadExpert(l, x, s, priority);
        if (occ[l][s] !== x) issued++;
        occ[l][s] = x;
      };
      for (let i = 0; i < 4; i++) {
        const x = rng.u32() % E;
        if (occ[l].includes(x)) continue;
        const s = rng.u32() % slots;
        if (need.includes(occ[l][s])) continue;
        load(x, s, 1 + (rng.u32() % 2));
      }
      // Demand loads for the rest, into slots holding nothing the visit needs.
      for (const x of need) {
        if (occ[l].includes(x)) continue;
        const s = occ[l].findIndex((o) => !need.includes(o));
        load(x, s, 0);
      }
      off.experts(l, r.ids, r.weights, spec.topK);
    }
    if (sameBits(res.endStep(), off.endStep())) exact++;
  }
  t.equal(exact, STEPS, 'every step bitwise equal to the resident engine');
  for (let l = 0; l < L; l++) for (let s = 0; s < slots; s++) off.evictSlot(l, s);
  // Let reads still in flight end (evicted ones are discarded or abandoned).
  for (let spin = 0; ; spin++) {
    const st = off.storeStats();
    const ended = st.loads - before.loads + (st.cancelled - before.cancelled) + (st.abandoned! - before.abandoned!);
    if (ended === issued) break;
    if (spin > 2000) {
      t.fail(`${issued} loads issued, ${ended} read, withdrawn or abandoned`);
      break;
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  const st = off.storeStats();
  t.equal(st.failed, 0);
  const reads = st.loads - before.loads;
  const abandoned = st.abandoned! - before.abandoned!;
  const bytes = st.bytesRead - before.bytesRead;
  t.ok(bytes >= reads * st.slotBytes && bytes <= (reads + abandoned) * st.slotBytes, 'bytes read: the completed reads, and part of each abandoned one');
  t.ok(st.paused! > before.paused!, `background reads paused for demand reads (${st.paused! - before.paused!} times; ${abandoned} abandoned)`);
  t.throws(() => off.throttleLoads(-1), /throttleLoads: ms must be a number/);

  // The case that once hung, step by step: a background read in flight (two or more slow
  // pieces), a second one queued behind it (background reads keep one of the two threads
  // free), then that one raised to demand: the free thread starts it at once (a demand
  // read is one piece) and it ends while the first read is still going. (Whether the first
  // read's next piece boundary falls inside the demand read is timing; the loop above
  // checks that pauses happen.)
  const { engine: e2 } = fx.make('q8_0', { slotsPerLayer: slots, ioThreads: 2 });
  t.ok(e2.storeStats().slotBytes >= 8192, 'a background read of this model is two pieces or more');
  e2.throttleLoads(150);
  e2.loadExpert(0, 0, 0, 1);
  e2.loadExpert(0, 1, 1, 1);
  t.equal(e2.expertState(0, 1), 1, 'the second background load waits in the queue');
  e2.loadExpert(0, 1, 1, 0);
  e2.waitExpert(0, 1);
  t.equal(e2.expertState(0, 0), 2, 'the raised load finished while the first background read was still in flight');
  e2.waitExpert(0, 0);
  e2.throttleLoads(0);
});

t.test('random loads, evictions and cancels leave a consistent store; the step after is exact', async (t) => {
  const fx = await fixture(t, 'qwen2_moe');
  const spec = fx.spec;
  const slots = 6;
  const { engine: res } = fx.make('q8_0');
  const { engine: off } = fx.make('q8_0', { slotsPerLayer: slots, ioThreads: 2 });
  const mirror = new SlotMirror(off, spec.numLayers, slots);
  const rng = new Rng(99);
  for (let i = 0; i < 400; i++) {
    const l = rng.u32() % spec.numLayers;
    const x = rng.u32() % spec.numExperts;
    const s = rng.u32() % slots;
    const op = rng.u32() % 4;
    if (op <= 1) {
      const at = mirror.slotOf(l, x);
      if (at >= 0 && at !== s) t.throws(() => off.loadExpert(l, x, s), /already in slot/);
      else mirror.load(l, x, s);
    } else if (op === 2) {
      mirror.evict(l, s);
    } else {
      mirror.cancel(l, x);
    }
    if (i % 50 === 0) off.waitExpert(l, mirror.occ[l].find((o) => o >= 0) ?? (mirror.load(l, x, s), x));
  }
  let consistent = true;
  for (let l = 0; l < spec.numLayers; l++) {
    for (let x = 0; x < spec.numExperts; x++) {
      const present = off.expertState(l, x) !== 0;
      if (present !== mirror.slotOf(l, x) >= 0) consistent = false;
    }
  }
  t.ok(consistent, 'expertState agrees with the loads, evictions and cancels made');
  const st = off.storeStats();
  t.equal(st.failed, 0);
  t.equal(st.bytesRead, st.loads * st.slotBytes);
  const parts = [0, 1].map((i) => ({ tokens: [3 + i, 40 + i, 77, 9 + i], start: 0, blocks: [i * 2, i * 2 + 1] }));
  const out = twinStep(t, spec, res, off, mirror, parts, false);
  t.ok(sameBits(out.a, out.b), 'logits bitwise equal after the random operations');
});

t.test('experts() waits for loading experts and counts the stall per layer', async (t) => {
  const fx = await fixture(t, 'olmoe');
  const spec = fx.spec;
  const { engine: off } = fx.make('f32', { slotsPerLayer: spec.numExperts, ioThreads: 1 });
  const mirror = new SlotMirror(off, spec.numLayers, spec.numExperts);
  const tokens = Array.from({ length: 12 }, (_, i) => (i * 37 + 5) % fx.vocabLimit);
  const { tokens: tk, seqs, blocks } = packParts([{ tokens, start: 0, blocks: [0] }]);
  let sawStall = false;
  off.beginStep(tk, seqs, blocks);
  for (let l = 0; l < spec.numLayers; l++) {
    const r = off.route(off.attention(l), tokens.length);
    const need = distinct(r.ids);
    const before = off.storeStats().stallSeconds;
    mirror.ensure(l, need); // loads just queued on one I/O thread: experts() has to wait
    const pending = need.filter((x) => off.expertState(l, x) !== 3).length;
    off.experts(l, r.ids, r.weights, spec.topK);
    const after = off.storeStats().stallSeconds;
    for (let j = 0; j < spec.numLayers; j++) if (j !== l) t.equal(after[j], before[j], `no stall counted on layer ${j}`);
    t.ok(after[l] >= before[l]);
    if (pending > 0 && after[l] > before[l]) sawStall = true;
    for (const x of need) t.equal(off.expertState(l, x), 3);
  }
  off.endStep();
  t.ok(sawStall, 'experts() waited for queued loads and counted it');

  // All resident (waited for by waitExpert first): experts() adds no stall at all.
  const before = off.storeStats().stallSeconds;
  off.beginStep(Int32Array.from([tokens[0]]), Int32Array.from([12, 1, 1, 1]), Int32Array.from([0]));
  for (let l = 0; l < spec.numLayers; l++) {
    const r = off.route(off.attention(l), 1);
    mirror.ensure(l, distinct(r.ids));
    for (const x of distinct(r.ids)) t.ok(off.waitExpert(l, x) >= 0);
    off.experts(l, r.ids, r.weights, spec.topK);
  }
  off.endStep();
  t.same(Array.from(off.storeStats().stallSeconds), Array.from(before), 'no stall when every expert is resident');

  // waitExpert reports its own wait.
  for (let s = 0; s < spec.numExperts; s++) off.evictSlot(0, s);
  off.loadExpert(0, 40, 0);
  off.loadExpert(0, 41, 1);
  const w = off.waitExpert(0, 41);
  t.ok(w >= 0 && w < 10, `waitExpert waited ${w} s`);
  t.equal(off.expertState(0, 40), 3, 'FIFO: the earlier load finished first');
});

t.test('errors, not crashes', async (t) => {
  const fx = await fixture(t, 'mixtral');
  const spec = fx.spec;
  const { engine: res } = fx.make('f32');
  const { engine: off } = fx.make('f32', { slotsPerLayer: 2 });
  const batch = packParts([{ tokens: [1, 2, 3, 4, 5], start: 0, blocks: [0] }]);

  t.throws(() => off.step(batch.tokens, batch.seqs, batch.blocks), /step in pieces/);
  for (const f of [
    () => res.loadExpert(0, 0, 0),
    () => res.cancelLoad(0, 0),
    () => res.evictSlot(0, 0),
    () => res.expertState(0, 0),
    () => res.waitExpert(0, 0),
    () => res.storeStats(),
  ]) {
    t.throws(f, /does not offload/);
  }
  t.throws(() => off.loadExpert(spec.numLayers, 0, 0), /layer 2 out of range/);
  t.throws(() => off.loadExpert(-1, 0, 0), /layer -1 out of range/);
  t.throws(() => off.loadExpert(0, spec.numExperts, 0), /expert 8 out of range/);
  t.throws(() => off.loadExpert(0, 0, 2), /slot 2 out of range/);
  t.throws(() => off.loadExpert(0, 0, -1), /slot -1 out of range/);
  t.throws(() => off.loadExpert(0, 1.5, 0), /must be an integer/);
  t.throws(() => off.loadExpert(0, '1' as unknown as number, 0), /must be an integer/);
  t.throws(() => off.evictSlot(0, 7), /slot 7 out of range/);
  t.throws(() => off.expertState(0, -3), /expert -3 out of range/);
  t.throws(() => off.cancelLoad(5, 0), /layer 5 out of range/);
  t.throws(() => off.waitExpert(0, 99), /expert 99 out of range/);

  // Out of order.
  t.throws(() => off.predictRouter(0, 1), /out of order/);
  t.throws(() => off.experts(0, Int32Array.from([0, 1]), Float32Array.from([0.5, 0.5]), 2), /out of order/);
  off.beginStep(batch.tokens, batch.seqs, batch.blocks);
  t.throws(() => off.attention(1), /out of order/);
  t.throws(() => off.predictRouter(0, 1), /out of order/);
  const r = off.route(off.attention(0), 5);
  t.throws(() => off.predictRouter(0, 0), /from < to/);
  t.throws(() => off.predictRouter(0, 2), /from < to/);
  t.throws(() => off.predictRouter(1, 1), /from < to/);
  t.equal(off.predictRouter(0, 1).length, 5 * spec.numExperts);
  const need = distinct(r.ids);
  t.throws(() => off.experts(0, r.ids, r.weights, 2), new RegExp(`expert ${need[0]} of layer 0 is not resident`));
  // A failed first call leaves the layer unstarted: other assignments are fine after it.
  const notNeeded = Array.from({ length: spec.numExperts }, (_, i) => i).find((i) => !need.includes(i))!;
  t.throws(() => off.expertsPart(0, r.ids, r.weights, 2, Int32Array.from([notNeeded])), /not among the layer's assignments/);
  off.loadExpert(0, need[0], 0);
  t.equal(off.expertsPart(0, r.ids, r.weights, 2, Int32Array.from([need[0]])), need.length - 1);
  t.throws(() => off.expertsPart(0, r.ids, r.weights, 2, Int32Array.from([need[0]])), /already ran/);
  const otherW = Float32Array.from(r.weights);
  otherW[0] += 1;
  t.throws(() => off.expertsPart(0, r.ids, otherW, 2, Int32Array.from([need[1]])), /differ/);
  t.throws(() => off.attention(1), /out of order/, 'the next layer waits until this one completes');
  t.throws(() => off.endStep(), /before every layer ran/);
  t.equal(off.predictRouter(0, 1).length, 5 * spec.numExperts, 'pre-gating still works mid-layer');
  // Stream the rest through slot 1.
  for (let i = 1; i < need.length; i++) {
    off.loadExpert(0, need[i], 1);
    t.equal(off.expertsPart(0, r.ids, r.weights, 2, Int32Array.from([need[i]])), need.length - 1 - i);
  }
  t.throws(() => off.experts(0, r.ids, r.weights, 2), /out of order/, 'the layer is complete');
  off.attention(1);
  // beginStep abandons a step midway.
  off.beginStep(batch.tokens, batch.seqs, batch.blocks);
  off.attention(0);

  // Bad offload options.
  t.throws(() => fx.make('f32', { slotsPerLayer: 0 }), /slotsPerLayer must be positive/);
  t.throws(() => fx.make('f32', { slotsPerLayer: spec.numExperts + 1 }), /slotsPerLayer must be in 1\.\.8/);
  t.throws(() => fx.make('f32', { slotsPerLayer: 1.5 }), /slotsPerLayer must hold integers/);
  t.throws(() => fx.make('f32', { slotsPerLayer: [2] }), /slotsPerLayer must have one entry per layer \(2\), got 1/);
  t.throws(() => fx.make('f32', { slotsPerLayer: [2, 2, 2] }), /one entry per layer \(2\), got 3/);
  t.throws(() => fx.make('f32', { slotsPerLayer: [2, 0] }), /slotsPerLayer must be positive \(layer 1\), got 0/);
  t.throws(() => fx.make('f32', { slotsPerLayer: [9, 2] }), /slotsPerLayer must be in 1\.\.8 \(layer 0\), got 9/);
  t.throws(() => fx.make('f32', { slotsPerLayer: [2, 1.5] }), /slotsPerLayer must hold integers \(layer 1\)/);
  t.throws(() => fx.make('f32', { slotsPerLayer: [2, '3'] as unknown as number[] }), /slotsPerLayer must hold numbers \(layer 1\)/);
  t.throws(() => fx.make('f32', { slotsPerLayer: '2' as unknown as number }), /slotsPerLayer must be a number or an array of one number per layer/);
  t.throws(() => fx.make('f32', {} as { slotsPerLayer: number }), /slotsPerLayer is required/);
  t.throws(() => fx.make('f32', { slotsPerLayer: 2, ioThreads: 0 }), /ioThreads must be in 1\.\.64/);
  t.throws(() => fx.make('f32', { slotsPerLayer: 2, file: path.join(fx.dir, 'no-such-dir', 'x.bin') }), /cannot create the expert file/);
  t.throws(() => fx.make('f32', { slotsPerLayer: 2, file: '' }), /must not be empty/);
});

t.test('unequal slots per layer: each layer its own arena, every bound by its own count', async (t) => {
  const fx = await fixture(t, 'mixtral'); // 2 layers of 8 experts
  const { engine: res } = fx.make('f32');
  const { engine: off } = fx.make('f32', { slotsPerLayer: [2, 5], ioThreads: 1 });
  const st0 = off.storeStats();
  const expertsTotal = 2 * 8 * res.info().expertBytes;
  t.equal(off.info().weightBytes, res.info().weightBytes - expertsTotal + 7 * st0.slotBytes, 'arenas of 2 and 5 slots');
  // The last slot of the small layer works, the next one is out of its range.
  off.loadExpert(0, 3, 1);
  t.ok(off.waitExpert(0, 3) >= 0);
  t.equal(off.expertState(0, 3), 3, 'loaded into slot 1 of layer 0');
  t.throws(() => off.loadExpert(0, 4, 2), /slot 2 out of range \(0\.\.1 in layer 0\)/);
  t.throws(() => off.evictSlot(0, 2), /slot 2 out of range \(0\.\.1 in layer 0\)/);
  t.throws(() => off.loadExpert(0, 4, 4), /slot 4 out of range/, 'a slot that exists in layer 1 does not in layer 0');
  t.equal(off.expertState(0, 4), 0, 'a rejected load changes nothing');
  // The large layer takes all its slots, and no more.
  for (let s = 0; s < 5; s++) off.loadExpert(1, 7 - s, s);
  for (let s = 0; s < 5; s++) off.waitExpert(1, 7 - s);
  t.same(Array.from({ length: 8 }, (_, x) => off.expertState(1, x)), [0, 0, 0, 3, 3, 3, 3, 3], 'five experts resident in layer 1');
  t.throws(() => off.loadExpert(1, 0, 5), /slot 5 out of range \(0\.\.4 in layer 1\)/);
  t.throws(() => off.loadExpert(1, 0, -1), /slot -1 out of range/);
  // Each slot keeps its own expert's bytes: a step over both layers is the resident engine's.
  const mirror = new SlotMirror(off, 2, [2, 5]);
  mirror.occ[0][1] = 3;
  for (let s = 0; s < 5; s++) mirror.occ[1][s] = 7 - s;
  const parts = [{ tokens: [5, 17, 42, 8, 99, 3], start: 0, blocks: [0] }];
  const out = twinStep(t, fx.spec, res, off, mirror, parts, false);
  t.ok(sameBits(out.a, out.b), 'logits bitwise equal');
  t.equal(off.storeStats().failed, 0);
  // Evicting the last slot of each layer empties exactly that slot (every slot is full here).
  const [last0, last1, before1] = [mirror.occ[0][1], mirror.occ[1][4], mirror.occ[1][3]];
  t.ok(last0 >= 0 && last1 >= 0 && before1 >= 0);
  off.evictSlot(0, 1);
  off.evictSlot(1, 4);
  t.equal(off.expertState(0, last0), 0);
  t.equal(off.expertState(1, last1), 0);
  t.equal(off.expertState(1, before1), 3, 'the slot before it is untouched');
});

t.test('a failed read is reported by the next wait for that expert', async (t) => {
  const fx = await fixture(t, 'mixtral');
  const { engine: off, file } = fx.make('q8_0', { slotsPerLayer: 2, ioThreads: 1 });
  // Cut the (deleted) expert file short through the process's own descriptor to it.
  const fd = fs.readdirSync('/proc/self/fd').find((n) => {
    try {
      return fs.readlinkSync(`/proc/self/fd/${n}`).startsWith(file);
    } catch {
      return false;
    }
  });
  t.ok(fd, 'a descriptor of the expert file');
  fs.truncateSync(`/proc/self/fd/${fd}`, 0);
  off.loadExpert(1, 3, 0);
  t.throws(() => off.waitExpert(1, 3), /short read of expert 3 of layer 1/);
  t.equal(off.expertState(1, 3), 0, 'a failed expert is absent');
  t.throws(() => off.waitExpert(1, 3), /neither resident nor loading/, 'the error is reported once');
  // Through experts() as well.
  const batch = packParts([{ tokens: [9], start: 0, blocks: [0] }]);
  off.beginStep(batch.tokens, batch.seqs, batch.blocks);
  off.attention(0);
  const ids = Int32Array.from([2, 4]);
  const w = Float32Array.from([0.5, 0.5]);
  off.loadExpert(0, 2, 0);
  off.loadExpert(0, 4, 1);
  t.throws(() => off.experts(0, ids, w, 2), /short read of expert [24] of layer 0/);
  // experts() reports the first failure it meets; the other read may still be in flight.
  // Waiting on both settles it (the reported one is gone, the other fails in turn).
  for (const e of [2, 4]) t.throws(() => off.waitExpert(0, e), /short read of expert|neither resident nor loading/);
  t.equal(off.storeStats().failed, 3);
  t.equal(off.storeStats().loads, 0);
});

t.test('predictRouter: the next layers\' routers (their Q8_0 copies) on the normalised residual', async (t) => {
  const fx = await fixture(t, 'qwen3_moe', { numLayers: 4 });
  const spec = fx.spec;
  const H = spec.hiddenSize;
  const E = spec.numExperts;
  const { engine: res } = fx.make('f32');
  const { engine: off } = fx.make('f32', { slotsPerLayer: E });
  const ref = ReferenceModel.fromSource(spec, (n) => Float32Array.from(fx.ckpt.float32(n)));
  const postNorm = (l: number) => fx.ckpt.float32(layerNames(spec, l).postAttnNorm);
  const router = (l: number) => fx.ckpt.float32(layerNames(spec, l).router);
  // The projection in plain TypeScript: rmsnorm(x) * w, then the router's rows.
  const project = (x: Float32Array, l: number, T: number): Float32Array => {
    const out = new Float32Array(T * E);
    const w = postNorm(l);
    const r = router(l);
    for (let t = 0; t < T; t++) {
      let ss = 0;
      for (let i = 0; i < H; i++) ss += x[t * H + i] ** 2;
      const inv = 1 / Math.sqrt(ss / H + spec.rmsNormEps);
      for (let e = 0; e < E; e++) {
        let d = 0;
        for (let i = 0; i < H; i++) d += r[e * H + i] * w[i] * x[t * H + i] * inv;
        out[t * E + e] = d;
      }
    }
    return out;
  };
  const cache = ref.newCache();
  const mirror = new SlotMirror(off, spec.numLayers, E);
  let worstPred = 0;
  let worstResidual = 0;
  let sameTop = 0;
  let topTotal = 0;
  let start = 0;
  for (const tokens of [[5, 88, 301, 17, 2, 640], [77], [13]]) {
    const T = tokens.length;
    const refResidual: Float32Array[] = [];
    ref.forward(tokens, cache, { onResidual: (l, x) => refResidual.push(Float32Array.from(x)) });
    const { tokens: tk, seqs, blocks } = packParts([{ tokens, start, blocks: [0] }]);
    res.beginStep(tk, seqs, blocks);
    off.beginStep(tk, seqs, blocks);
    for (let l = 0; l < spec.numLayers; l++) {
      const r = res.route(res.attention(l), T);
      off.attention(l);
      if (l + 1 < spec.numLayers) {
        const x = res.residual();
        const pred = res.predictRouter(l, spec.numLayers - 1);
        t.equal(pred.length, (spec.numLayers - 1 - l) * T * E);
        for (let j = l + 1; j < spec.numLayers; j++) {
          const slice = pred.subarray((j - l - 1) * T * E, (j - l) * T * E);
          const exact = project(x, j, T);
          worstPred = Math.max(worstPred, relMaxError(exact, slice));
          // The top-k it predicts against the float32 router's.
          const a = topKIds(exact, T, E, spec.topK);
          const b = topKIds(slice, T, E, spec.topK);
          for (let i = 0; i < T; i++) {
            const want = new Set(a.subarray(i * spec.topK, (i + 1) * spec.topK));
            for (const id of b.subarray(i * spec.topK, (i + 1) * spec.topK)) if (want.has(id)) sameTop++;
            topTotal += spec.topK;
          }
        }
        t.ok(sameBits(res.predictRouter(l, l + 1), pred.subarray(0, T * E)), 'predictRouter(l, l+1) is the first slice of predictRouter(l, last)');
        t.ok(sameBits(off.predictRouter(l, spec.numLayers - 1), pred), 'the offloading engine predicts the same');
      }
      res.experts(l, r.ids, r.weights, spec.topK);
      mirror.ensure(l, distinct(r.ids));
      off.experts(l, r.ids, r.weights, spec.topK);
      // The residual predictRouter reads is the model's hidden state: after the layer it
      // equals the reference's.
      worstResidual = Math.max(worstResidual, relMaxError(refResidual[l], res.residual()));
    }
    t.ok(sameBits(res.endStep(), off.endStep()));
    start += T;
  }
  t.comment(
    `predictRouter (Q8_0 router copies, 8-bit activations) vs the float32 routers in TypeScript: worst relative error ${worstPred.toExponential(2)}, ` +
      `top-${spec.topK} agreement ${sameTop} of ${topTotal}; residual vs reference ${worstResidual.toExponential(2)}`,
  );
  t.ok(worstPred > 0 && worstPred < 2e-2, `predictRouter within 2e-2 relative, as 8-bit rounding gives (${worstPred})`);
  t.ok(sameTop >= 0.97 * topTotal, `the same top-${spec.topK} for ${sameTop} of ${topTotal} predicted ids`);
  t.ok(worstResidual < 1e-4, `residual within 1e-4 relative of the reference (${worstResidual})`);
});

t.test('without offloading, expertsPart in pieces equals experts() bit for bit', async (t) => {
  const fx = await fixture(t, 'qwen2_moe');
  const spec = fx.spec;
  const { engine: e } = fx.make('q8_0');
  const { tokens, seqs, blocks } = packParts([{ tokens: [4, 99, 250, 31, 7, 600, 12, 3, 45], start: 0, blocks: [0] }]);
  const run = (pieces: number): Float32Array => {
    // The same positions each time: the KV cache is rewritten with the same values.
    e.beginStep(tokens, seqs, blocks);
    for (let l = 0; l < spec.numLayers; l++) {
      const r = e.route(e.attention(l), tokens.length);
      if (pieces === 0) {
        e.experts(l, r.ids, r.weights, spec.topK);
        continue;
      }
      const need = distinct(r.ids).reverse();
      let left = need.length;
      for (let i = 0; i < need.length; i += pieces) left = e.expertsPart(l, r.ids, r.weights, spec.topK, Int32Array.from(need.slice(i, i + pieces)));
      t.equal(left, 0);
    }
    return e.endStep();
  };
  const whole = run(0);
  for (const pieces of [1, 3, 7]) t.ok(sameBits(run(pieces), whole), `${pieces} experts per call`);
  t.ok(sameBits(run(0), whole), 'and the whole again');
});
