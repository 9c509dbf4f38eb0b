// The one typed contract over the native addon (native/src/addon.cc registers every
// function declared here). Nothing else in the project loads the .node file.
//
// Conventions: byte ranges are [begin, end) (begin inclusive, end exclusive); sizes
// and offsets are plain numbers (exact below 2^53, which the native side enforces).
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * CPU features detected at run time (cpuid + XCR0). A flag is true only when the
 * CPU has the instructions, the OS saves their register state, and every flag it
 * builds on is true (avx2 ⇒ avx; avx512* ⇒ avx512f ⇒ avx2 + fma + f16c;
 * amxInt8/amxBf16 ⇒ amxTile). AMX reports hardware + XCR0 only: on Linux a process
 * must still request tile-data permission (arch_prctl) before using it.
 */
export interface CpuFeatures {
  sse42: boolean;
  avx: boolean;
  avx2: boolean;
  fma: boolean;
  f16c: boolean;
  avx512f: boolean;
  avx512bw: boolean;
  avx512vl: boolean;
  avx512vnni: boolean;
  avx512bf16: boolean;
  avx512fp16: boolean;
  amxTile: boolean;
  amxInt8: boolean;
  amxBf16: boolean;
}

export interface CudaDevice {
  /** e.g. "NVIDIA L4". */
  name: string;
  /** Global memory in bytes. */
  totalMemory: number;
  /** "major.minor", e.g. "8.9". */
  computeCapability: string;
}

export interface CudaInfo {
  /** True when the addon was built with nvcc (MOE_SERVE_CUDA not 0 and nvcc found). */
  compiled: boolean;
  /** Devices the CUDA runtime can use; 0 whenever `error` is set. */
  deviceCount: number;
  /** Why no device is usable (no driver, no device, built without CUDA), else null. */
  error: string | null;
  /** One entry per device (at most 64). */
  devices: CudaDevice[];
}

/**
 * An open, read-only memory mapping of a safetensors file. `close()` detaches the
 * ArrayBuffer returned with it (every view over it becomes length 0) and unmaps the
 * file; calling it again is a no-op. Without `close()` the file is unmapped once both
 * this handle and the ArrayBuffer are garbage-collected.
 */
export interface SafetensorsMapping {
  close(): void;
  readonly closed: boolean;
  /** Size of the mapping (the whole file) in bytes; 0 once closed. */
  readonly byteLength: number;
}

/** One tensor entry of a validated safetensors header. */
export interface NativeTensorEntry {
  name: string;
  /** One of F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL F8_E4M3 F8_E5M2. */
  dtype: string;
  shape: number[];
  /** Byte range [begin, end) relative to the start of the data section. */
  begin: number;
  end: number;
}

export interface SafetensorsOpenResult {
  handle: SafetensorsMapping;
  /**
   * The whole file (header included), zero-copy over a PROT_READ mapping: read only,
   * a write through any view kills the process. Detached by `handle.close()`.
   */
  buffer: ArrayBuffer;
  /** File offset of the data section: 8 + header length. */
  dataOffset: number;
  fileSize: number;
  /** `__metadata__` of the header ({} when absent). */
  metadata: Record<string, string>;
  /** In header order. */
  tensors: NativeTensorEntry[];
}

/** Options of a NativeEngine: the model's shape, the weight format, threads and the KV pool. */
export interface NativeEngineOptions {
  vocab: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  experts: number;
  topK: number;
  expertWidth: number;
  /** 0 when there is no shared expert. */
  sharedWidth: number;
  /** softmax → top-k → renormalise (true), or keep the softmax values (false). */
  renormTopK: boolean;
  qkNorm: 'none' | 'per_head' | 'full';
  qkvBias: boolean;
  tieEmbeddings: boolean;
  rmsEps: number;
  ropeTheta: number;
  maxPositions: number;
  /** Storage format of the large matrices: f32, f16, bf16, q8_0, q4_0. */
  weights: string;
  threads: number;
  kvBlockSize: number;
  kvBlocks: number;
  /** KV cache elements: float32 (the default) or IEEE float16. */
  kvCacheType?: 'f32' | 'f16';
  /**
   * Expert offloading. When set, routed experts are not held in RAM: set_tensor writes
   * each expert, packed in the engine's format, to `file` (created, then unlinked while
   * open, so nothing is left behind), and the fast tier is `slotsPerLayer` expert slots
   * per layer (one count for every layer, or one per layer). Only the step in pieces runs (step() throws); experts(l, ...) needs each
   * expert it runs to be resident or loading (it waits for loading ones, counting the
   * stall). Shared experts and every non-expert weight stay resident.
   */
  offload?: NativeOffloadOptions;
}

export interface NativeOffloadOptions {
  /** Path of the expert file (the slow tier). It must not exist: the engine creates it and unlinks it at once. */
  file: string;
  /**
   * Expert slots of the fast tier (RAM budget), each 1 .. experts: one number for every
   * layer, or an array of one per layer (each layer's arena holds its own count, and
   * slots beyond a layer's count are rejected).
   */
  slotsPerLayer: number | readonly number[];
  /** I/O threads that perform loads (default 2). */
  ioThreads?: number;
  /** Read with O_DIRECT (default true); falls back to buffered reads plus dropping the pages when the file system refuses it. */
  direct?: boolean;
}

/** Counters of the native expert store since the engine was made. */
export interface NativeStoreStats {
  /** Expert reads completed (discarded ones included), and the bytes read (slotBytes for each completed read, what was read of abandoned ones). */
  loads: number;
  bytesRead: number;
  /**
   * Wall seconds with at least one read in flight (failed and discarded reads included),
   * and the sum of the reads' own durations (a paused background read's pauses included):
   * bytesRead / busySeconds is the bandwidth the slow tier delivered as it was used.
   * Always set by the addon.
   */
  busySeconds?: number;
  readSeconds?: number;
  /** Seconds the engine waited in experts(l, ...) for loads to finish, per layer (waitExpert's waits are not counted here; it returns them). */
  stallSeconds: Float64Array;
  /** Queued loads withdrawn before they started: cancelLoad, evictSlot, or loadExpert reassigning the slot. */
  cancelled: number;
  /** Reads that completed after their slot was emptied or reassigned (their bytes were not used). Always set by the addon. */
  discarded?: number;
  /** Reads that failed; each error is thrown once by the next waitExpert / experts() for that expert. Always set by the addon. */
  failed?: number;
  /** Times a background (priority > 0) read paused between its chunks for a demand read. Always set by the addon. */
  paused?: number;
  /** Background reads stopped between chunks because their slot was emptied or reassigned (not in `loads`; their bytes are in bytesRead). Always set by the addon. */
  abandoned?: number;
  /** Whether reads bypass the page cache (O_DIRECT was accepted). */
  direct: boolean;
  /** Bytes of one expert in the file and in a slot (rounded up to the direct-I/O alignment). */
  slotBytes: number;
}

/**
 * The native CPU engine. A step's batch is given as three flat arrays: `tokens` (all new
 * tokens, sequence after sequence), `seqs` ([startPos, nTokens, wantLogits 0/1, nBlocks] per
 * sequence) and `blocks` (the sequences' KV block tables, concatenated). Logits come back
 * as (rows, vocab), one row per sequence with wantLogits, in batch order.
 */
export interface NativeEngine {
  /** Loads one tensor (rows, cols) stored as F32, F16 or BF16, converting it to the engine's format. Roles: see native/src/engine.h. */
  setTensor(role: string, layer: number, expert: number, bytes: Uint8Array, dtype: string, rows: number, cols: number): void;
  /** Checks that every tensor was given; the engine runs after this. */
  finalize(): void;
  /**
   * The fused step: every layer with the model's own router. With `out` (at least rows x
   * vocab floats) the logits are written into it and the result is a view of its start.
   */
  step(tokens: Int32Array, seqs: Int32Array, blocks: Int32Array, out?: Float32Array): Float32Array;
  /** The step in pieces: beginStep, then per layer in order attention(l) → experts(l, ...), then endStep. */
  beginStep(tokens: Int32Array, seqs: Int32Array, blocks: Int32Array): void;
  /** Attention of layer l for the step's tokens; returns the router logits (tokens, experts). */
  attention(layer: number): Float32Array;
  /**
   * Routed experts of layer l: ids and gate weights, k per token (tokens * k entries).
   * Runs every expert of ids not yet run by expertsPart, and completes the layer.
   */
  experts(layer: number, ids: Int32Array, weights: Float32Array, k: number): void;
  /**
   * Part of layer l's routed experts: only the experts in `subset` (distinct ids among
   * ids) run now; their outputs are kept, and the layer completes (combine, next layer)
   * on the call that has run the last of them (or on experts(), which runs the rest). So
   * a layer may stream more experts than it has slots. Every call of a layer must pass
   * the same ids and weights; the shared expert runs with the first call. The result
   * equals a single experts() call bit for bit. Returns the number of the layer's experts
   * still to run (0: the layer is done, attention(l + 1) is next).
   */
  expertsPart(layer: number, ids: Int32Array, weights: Float32Array, k: number, subset: Int32Array): number;
  /** Logits of the step in pieces (as step(); `out` likewise). */
  endStep(out?: Float32Array): Float32Array;
  /** The model's gating rule on router logits (tokens, experts) → top-k ids and weights. */
  route(routerLogits: Float32Array, tokens: number): { ids: Int32Array; weights: Float32Array };
  info(): { weightBytes: number; kvBytes: number; expertBytes: number; weights: string; isa: string; threads: number; offload: boolean };
  /** Milliseconds per phase of the steps since the last call; zeros unless MOE_SERVE_PROFILE=1. */
  takeProfile(): Record<string, number>;
  /**
   * Pre-gating: the routers of layers from+1 .. to applied to the step's current hidden
   * state (the residual after layer `from`'s attention, normalised by each target layer's
   * MoE input norm). Call after attention(from) and before experts(from) completes the
   * layer; 0 <= from < to < layers. Returns (to - from, tokens, experts) logits. Works with
   * or without offloading.
   */
  predictRouter(from: number, to: number): Float32Array;
  /** The residual stream (tokens, hidden) of the current or last step, a copy (for tests and diagnostics). */
  residual(): Float32Array;
  /**
   * Offloading only: queues an asynchronous read of (layer, expert) into `slot` of that
   * layer; whatever the slot held is dropped (no longer resident; a queued load of it is
   * withdrawn). Queued reads start by priority (0, the default, is demand; a larger
   * number waits behind every smaller one), FIFO within a priority. A background read
   * (priority > 0) goes in pieces (up to 1 MiB) and, between them, pauses while a demand
   * read is in flight or about to start, unless something waits for it; it stops when
   * its slot is emptied or reassigned meanwhile (storeStats: paused, abandoned). When the expert is already queued, reading or resident in that
   * slot it only raises a queued read to a more urgent priority; throws when it is in
   * another slot. experts() raises the queued reads it waits for to priority 0.
   */
  loadExpert(layer: number, expert: number, slot: number, priority?: number): void;
  /** Offloading only: withdraws a queued load that has not started; true when withdrawn (the slot is then empty). */
  cancelLoad(layer: number, expert: number): boolean;
  /** Offloading only: empties the slot (the expert it held is no longer resident; a read in flight into it is discarded when it ends). */
  evictSlot(layer: number, slot: number): void;
  /** Offloading only: 0 not present, 1 queued, 2 reading, 3 resident. */
  expertState(layer: number, expert: number): number;
  /** Offloading only: blocks until (layer, expert) is resident; returns the seconds waited. Throws if it is neither resident nor loading, or its read failed. */
  waitExpert(layer: number, expert: number): number;
  /** Offloading only, for tests and diagnostics: at most n more queued reads start from now on (n < 0: no limit, the default). */
  gateLoads(n: number): void;
  /** Offloading only, for tests and diagnostics: every piece of a read (a demand read is one piece, a background read several) lasts at least ms milliseconds (0: no throttle, the default), as on a slower device. */
  throttleLoads(ms: number): void;
  /** Offloading only: the store's counters. */
  storeStats(): NativeStoreStats;
  /** Frees the weights and the KV cache; the engine is unusable after. */
  close(): void;
}

/** Weight storage formats of the matrix kernels (ggml block layouts for q8_0 / q4_0). */
export type WeightType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_0';
/** Kernel families; the default is the best the CPU supports unless MOE_SERVE_ISA names another. */
export type KernelIsa = 'scalar' | 'avx2' | 'avx512';

export interface KernelInfo {
  /** What this CPU and OS support. */
  best: KernelIsa;
  /** What serves calls now (MOE_SERVE_ISA at first use, or setIsa). */
  active: KernelIsa;
  /** The avx512 family uses vpdpbusd for q8_0 / q4_0. */
  vnni: boolean;
  /** The avx512 family uses vdpbf16ps for bf16. */
  bf16: boolean;
  /**
   * The avx512 family's Q8_0 products of 32 tokens and more go through Intel AMX tiles
   * (TDPBSSD; bitwise the VNNI kernel's results): the CPU and OS support them, a start-up
   * self-test against the VNNI kernel passed, a start-up timing found them faster than it,
   * and MOE_SERVE_AMX is not 0.
   */
  amx: boolean;
  /** Why AMX is or is not used ("in use", "not supported by this CPU ...", ...). */
  amxStatus: string;
}

/** Result of kernelBench: one matmul over all rows, timed natively. */
export interface KernelBenchResult {
  calls: number;
  /** Seconds per call (mean). */
  seconds: number;
  /** Weight bytes read per call (rows * rowBytes). */
  bytesPerCall: number;
  /** Distinct weight matrices cycled through, together >= minBytes. */
  copies: number;
  /** Seconds of one prepare_acts for the same activations (buffer reused). */
  prepareSeconds: number;
  isa: KernelIsa;
  checksum: number;
}

/** Result of macPeakBench: the int8 multiply-accumulate probe. */
export interface MacPeakResult {
  /** Multiply-accumulates done by all threads together. */
  macs: number;
  seconds: number;
  checksum: number;
}

/** Result of streamBench: the memory-bandwidth probe. */
export interface StreamBenchResult {
  passes: number;
  /** Seconds per pass over the whole buffer (mean). */
  seconds: number;
  bytes: number;
  checksum: number;
}

export interface NativeAddon {
  /** Version of the native addon, e.g. "0.1.0". */
  version(): string;
  cpuFeatures(): CpuFeatures;
  /** Never throws; reports problems in `error`. */
  cudaInfo(): CudaInfo;
  /** std::thread::hardware_concurrency(), at least 1. */
  hardwareConcurrency(): number;
  /**
   * Maps `path` read-only and validates the whole header and layout before
   * returning. Throws an Error with a `code`: ST_IO (cannot open/stat/map),
   * ST_TRUNCATED, ST_HEADER_LENGTH, ST_HEADER_JSON, ST_BAD_ENTRY, ST_DTYPE,
   * ST_SHAPE_MISMATCH, ST_OFFSET_RANGE, ST_OVERLAP, ST_HOLE. The message names the
   * file, the tensor when there is one, and the problem.
   */
  safetensorsOpen(path: string): SafetensorsOpenResult;

  // ---- Matrix kernels (native/src/kernels*.cc); test and benchmark entry points ----
  kernelInfo(): KernelInfo;
  /** Forces a kernel family for this process; false (and no change) if the CPU cannot run it. */
  setIsa(name: KernelIsa): boolean;
  /** Row-major (rows, cols) float32 -> the format's bytes (rows * rowBytes); cols % 32 == 0 for q8_0 / q4_0. */
  quantizeRows(type: WeightType, f32: Float32Array, rows: number, cols: number): Uint8Array;
  /** One row of `cols` weights back to float32. */
  dequantizeRow(type: WeightType, bytes: Uint8Array, cols: number): Float32Array;
  /**
   * The activations X (n, cols) as the kernels for `type` multiply them: bf16-rounded for
   * bf16, int8 blocks times their scale for q8_0 / q4_0, unchanged for f32 / f16.
   */
  actsDequantize(type: WeightType, x: Float32Array, n: number, cols: number): Float32Array;
  /**
   * Y = X W^T with the active kernels on a fresh pool of `threads`: weights (rows, cols) in
   * `type`, X (n, cols) float32; returns Y (n, rows), y[t * rows + r].
   */
  matmulTest(
    type: WeightType,
    weights: Uint8Array,
    rows: number,
    cols: number,
    x: Float32Array,
    n: number,
    threads: number,
  ): Float32Array;
  /**
   * The AMX Q8_0 kernel with its tile instructions modelled in C++ (any CPU; for tests):
   * like matmulTest for q8_0 on one thread, for the tokens [0, n / 32 * 32) (its 16-token
   * groups); the outputs of the other tokens are NaN.
   */
  amxMatmulTest(weights: Uint8Array, rows: number, cols: number, x: Float32Array, n: number): Float32Array;
  /**
   * The engine's attention of one token for `nq` query heads of KV head `g`, with the
   * active ISA, over a paged cache in the engine's layout (native/src/vecops.h: keys
   * transposed within a block): returns (nq, headDim) floats.
   */
  attendTest(
    q: Float32Array,
    /** Float32Arrays, or Uint16Arrays of float16 bits (a float16 cache). */
    keys: Float32Array | Uint16Array,
    values: Float32Array | Uint16Array,
    blocks: Int32Array,
    nq: number,
    headDim: number,
    blockSize: number,
    kvHeads: number,
    g: number,
    visible: number,
    scale: number,
  ): Float32Array;
  /**
   * Sampling weights over logits[off, off + n): out[i] = e^((logits[off + i] - max) /
   * temperature), computed in float32 with the active ISA (0 below e^-87.3); returns their sum.
   */
  expWeights(logits: Float32Array, off: number, n: number, temperature: number, out: Float64Array): number;
  /** silu(gate) * up element-wise with the active ISA (the experts' SwiGLU). */
  siluMulTest(gate: Float32Array, up: Float32Array): Float32Array;
  /**
   * Activations of `rows` gathered from those prepared for all n rows of x, and prepared
   * directly from those rows' inputs: the bytes of both (equal when gathering is exact).
   */
  gatherActsTest(type: WeightType, x: Float32Array, n: number, cols: number, rows: Int32Array): [Uint8Array, Uint8Array];
  /**
   * Runs `items` short items on a pool of `threads` (>= 2) where the first item run by a
   * worker throws; the error must reach the caller (this function then throws it). Returns
   * the number of items run if no worker ever got an item.
   */
  poolThrowTest(threads: number, items: number): number;
  /**
   * Times matmuls (rows, cols) x n tokens on `threads`, cycling over distinct weight copies
   * totalling >= minBytes so that caches do not help, for at least `seconds`.
   */
  kernelBench(
    type: WeightType,
    rows: number,
    cols: number,
    n: number,
    threads: number,
    minBytes: number,
    seconds: number,
  ): KernelBenchResult;
  /** Memory-bandwidth probe: `threads` stream-read a buffer of `bytes` for at least `seconds`. */
  /** keep: hold the probe buffer for the next call of the same size (probes between chunks of a measurement). */
  streamBench(bytes: number, threads: number, seconds: number, keep?: boolean): StreamBenchResult;
  /**
   * Compute probe: `threads` threads run the active ISA's int8 dot-product instructions
   * (those the quantized kernels use) on registers for at least `seconds` (at most 60):
   * the int8 MAC rate a compute-bound quantized matmul cannot exceed. `mix` "q4_0": the
   * instruction mix of the Q4_0 token-group kernel where it differs (AVX2: four vpmaddubsw
   * per vpmaddwd), whose rate can pass the default ("q8_0") one.
   */
  macPeakBench(threads: number, seconds: number, mix?: 'q8_0' | 'q4_0'): MacPeakResult;
  /** The CPU engine (native/src/engine.h). */
  NativeEngine: new (options: NativeEngineOptions) => NativeEngine;
}

/** Walks up from this module to the moe-serve package root (works from src/ and dist/). */
function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = path.join(dir, 'package.json');
    if (fs.existsSync(pkg)) {
      try {
        if ((JSON.parse(fs.readFileSync(pkg, 'utf8')) as { name?: unknown }).name === 'moe-serve') return dir;
      } catch {
        // not ours; keep walking
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error('moe-serve: cannot find the package root (package.json named "moe-serve")');
    dir = parent;
  }
}

/** Absolute path of the compiled addon. */
export function nativeAddonPath(): string {
  return path.join(packageRoot(), 'build', 'Release', 'moe_native.node');
}

let cached: NativeAddon | undefined;

/** Loads the addon once per thread and returns it. */
export function loadNative(): NativeAddon {
  if (cached) return cached;
  const file = nativeAddonPath();
  if (!fs.existsSync(file)) {
    throw new Error(
      `moe-serve native addon not found at ${file}. Run 'npm install' (or 'npm run build:native') to build it.`,
    );
  }
  const require = createRequire(import.meta.url);
  cached = require(file) as NativeAddon;
  return cached;
}
