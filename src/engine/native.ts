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
