// The expert cache's capacity setting → expert slots per layer.
//
// The setting is either a fraction of all routed experts ("0.25", "25%") or a RAM
// budget in bytes ("12GiB", "512MiB", "3.5GB", "1048576B"). The budget is split
// equally across layers: every layer gets the same number of slots,
//
//   fraction f: slots = floor(f × experts per layer)
//   bytes B:    slots = floor(B / (layers × bytes of one expert slot))
//
// clamped to the experts per layer. A layer needs at least one slot; with fewer slots
// than top-k every visit streams its experts through the slots (correct, but each token
// then reads its experts from the slow tier), so a budget below that works and is slow.

const UNITS: Record<string, number> = {
  b: 1,
  kb: 1e3,
  mb: 1e6,
  gb: 1e9,
  tb: 1e12,
  kib: 2 ** 10,
  mib: 2 ** 20,
  gib: 2 ** 30,
  tib: 2 ** 40,
};

/** Alignment of expert slots and file offsets for direct I/O. */
export const DIRECT_IO_ALIGN = 4096;

export type CapacitySpec = { kind: 'fraction'; fraction: number } | { kind: 'bytes'; bytes: number };

export class CapacityError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CapacityError';
  }
}

/** Parses "0.25", "25%", "12GiB", "512 MiB", "4096B". */
export function parseCapacity(text: string): CapacitySpec {
  const s = text.trim();
  const bad = (why: string): never => {
    throw new CapacityError(
      `expert cache capacity ${JSON.stringify(text)}: ${why}; give a fraction of all experts in (0, 1] (e.g. 0.25 or 25%) or bytes with a unit (e.g. 512MiB, 12GiB)`,
    );
  };
  if (s === '') bad('empty');
  const pct = /^(\d+(?:\.\d+)?)\s*%$/.exec(s);
  if (pct) {
    const f = Number(pct[1]) / 100;
    if (!(f > 0 && f <= 1)) bad('a percentage must be in (0, 100]');
    return { kind: 'fraction', fraction: f };
  }
  const m = /^(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)$/.exec(s);
  if (!m) return bad('not a number');
  const n = Number(m[1]);
  const unit = m[2].toLowerCase();
  if (unit === '') {
    if (!(n > 0 && n <= 1)) bad('a number without a unit is a fraction and must be in (0, 1]');
    return { kind: 'fraction', fraction: n };
  }
  const mult = UNITS[unit];
  if (mult === undefined) bad(`unknown unit ${JSON.stringify(m[2])} (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)`);
  const bytes = Math.floor(n * mult);
  if (!(bytes > 0) || !Number.isSafeInteger(bytes)) bad('the byte count must be a positive integer below 2^53');
  return { kind: 'bytes', bytes };
}

/** Bytes of one row of `cols` weights in an engine format (f32, f16, bf16, q8_0, q4_0). */
export function rowBytes(format: string, cols: number): number {
  switch (format) {
    case 'f32':
      return cols * 4;
    case 'f16':
    case 'bf16':
      return cols * 2;
    case 'q8_0':
      return (cols / 32) * 34;
    case 'q4_0':
      return (cols / 32) * 18;
    default:
      throw new Error(`unknown weight format ${format}`);
  }
}

/** Bytes of one routed expert (gate + up + down) in the engine's packed format, and its slot (aligned for direct I/O). */
export function expertSlotBytes(format: string, hidden: number, width: number): { expertBytes: number; slotBytes: number } {
  const expertBytes = rowBytes(format, hidden) * 2 * width + rowBytes(format, width) * hidden;
  return { expertBytes, slotBytes: Math.ceil(expertBytes / DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN };
}

export interface SlotShape {
  layers: number;
  experts: number;
  /** Bytes of one expert slot. */
  slotBytes: number;
}

/** Slots per layer for a capacity (setting text or parsed); throws CapacityError when it gives no slot. */
export function slotsPerLayer(capacity: string | CapacitySpec, shape: SlotShape): number {
  const c = typeof capacity === 'string' ? parseCapacity(capacity) : capacity;
  const raw = c.kind === 'fraction' ? Math.floor(c.fraction * shape.experts + 1e-9) : Math.floor(c.bytes / (shape.layers * shape.slotBytes));
  if (raw < 1) {
    const given = c.kind === 'fraction' ? `${c.fraction} of ${shape.experts} experts per layer` : `${c.bytes} bytes over ${shape.layers} layers of ${shape.slotBytes}-byte expert slots`;
    throw new CapacityError(
      `expert cache capacity too small: ${given} gives no expert slot per layer; at least one slot per layer is needed ` +
        `(fraction ${(1 / shape.experts).toPrecision(3)}, or ${shape.layers * shape.slotBytes} bytes)`,
    );
  }
  return Math.min(shape.experts, raw);
}
