// The expert cache's capacity setting → expert slots per layer.
//
// The setting is either a fraction of all routed experts ("0.25", "25%") or a RAM
// budget in bytes ("12GiB", "512MiB", "3.5GB", "1048576B"). How the budget is split
// across layers is a second setting (offloadSplit):
//
// - equal (the default): every layer gets the same number of slots,
//     fraction f: slots = floor(f × experts per layer)
//     bytes B:    slots = floor(B / (layers × bytes of one expert slot))
//   clamped to the experts per layer.
// - weights w0,w1,...,w(L-1) (one non-negative number per layer): the total budget,
//     fraction f: floor(f × experts per layer) × layers
//     bytes B:    floor(B / bytes of one expert slot)
//   is divided in proportion to the weights. Layers do not route alike (some spread a
//   batch's tokens over more experts, or reuse them less, than others), so an operator
//   who measured it, e.g. with `moe-serve sim --split` on a routing trace, can give the
//   slots to the layers that miss most. Every layer keeps at least one slot and gets at most all its experts;
//   what a bound takes or leaves is shared by the other layers in proportion to their
//   weights, and the fractions are rounded by largest remainder (splitSlots).
//
// A layer needs at least one slot; with fewer slots than top-k every visit streams its
// experts through the slots (correct, but each token then reads its experts from the
// slow tier), so a budget below that works and is slow.

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

/** How the slot budget is split across layers: equally, or in proportion to one weight per layer. */
export type SplitSpec = { kind: 'equal' } | { kind: 'weights'; weights: number[]; text: string };

export const EQUAL_SPLIT: SplitSpec = Object.freeze({ kind: 'equal' });

/** What a split setting may be, for error messages; with the number of layers when known. */
function splitUsage(layers?: number): string {
  if (layers === undefined) return 'give equal, or one non-negative weight per layer, comma-separated (e.g. 2,2,1,1 for 4 layers)';
  const example = layers <= 8 ? ` (e.g. ${Array.from({ length: layers }, (_, l) => (l < layers / 2 ? 2 : 1)).join(',')})` : '';
  return `give equal, or ${layers} non-negative weight${layers === 1 ? '' : 's'}, one per layer, comma-separated${example}`;
}

/**
 * Parses the split setting: "equal" (or empty), or comma-separated non-negative weights
 * ("2,2,1,1", "1.5,1,0.5"). With `layers`, the number of weights must match it (the model
 * or trace, `source`, decides it, so that check may come later: slotsByLayer makes it too).
 */
export function parseSplit(text: string, layers?: number, source = 'model'): SplitSpec {
  const s = text.trim();
  if (s === '' || s.toLowerCase() === 'equal') return EQUAL_SPLIT;
  const bad = (why: string): never => {
    throw new CapacityError(`expert cache split ${JSON.stringify(text)}: ${why}; ${splitUsage(layers)}`);
  };
  const parts = s.split(',').map((p) => p.trim());
  const weights = parts.map((p, i) => {
    if (/^-\s*(\d+(\.\d*)?|\.\d+)$/.test(p)) bad(`weight ${i + 1} (${JSON.stringify(p)}) is negative`);
    if (!/^(\d+(\.\d*)?|\.\d+)$/.test(p)) bad(`weight ${i + 1} (${JSON.stringify(p)}) is not a number`);
    const w = Number(p);
    if (!Number.isFinite(w)) bad(`weight ${i + 1} (${JSON.stringify(p)}) is not a finite number`);
    return w;
  });
  if (!weights.some((w) => w > 0)) bad('every weight is 0 (at least one layer must have a positive weight)');
  if (layers !== undefined && weights.length !== layers) bad(splitCountWhy(weights.length, layers, source));
  return { kind: 'weights', weights, text: parts.join(',') };
}

function splitCountWhy(given: number, layers: number, source = 'model'): string {
  return `${given} weight${given === 1 ? '' : 's'}, but the ${source} has ${layers} layer${layers === 1 ? '' : 's'} (one weight per layer is needed)`;
}

/** The split as setting text: "equal" or the weights. */
export function splitText(split: SplitSpec): string {
  return split.kind === 'equal' ? 'equal' : split.text;
}

/**
 * Divides `total` slots over layers in proportion to `weights` (one per layer, >= 0, not
 * all 0), each layer getting at least 1 and at most `experts`:
 *
 *   share(l) = clamp(λ × w(l), 1, experts), with λ such that the shares sum to total,
 *
 * i.e. a layer whose proportional share is above `experts` is capped and the excess goes
 * to the other layers in proportion to their weights, and a layer whose share is below 1
 * gets 1, taken from the others the same way. A zero weight means one slot. The shares
 * are then rounded by largest remainder (ties: the lower layer first), so the counts sum
 * to `total` exactly. A total above what the layers can hold (every layer with a positive
 * weight at `experts`, the others at 1) is capped there. Throws CapacityError when
 * total < layers (a layer needs a slot).
 */
export function splitSlots(total: number, weights: readonly number[], experts: number): number[] {
  const L = weights.length;
  if (L === 0) throw new CapacityError('expert cache split: no layers');
  if (!Number.isInteger(experts) || experts < 1) throw new CapacityError(`expert cache split: experts per layer must be a positive integer, got ${experts}`);
  if (!Number.isInteger(total) || total < 0) throw new CapacityError(`expert cache split: the slot budget must be a non-negative integer, got ${total}`);
  for (const w of weights) if (!(w >= 0) || !Number.isFinite(w)) throw new CapacityError(`expert cache split: weights must be finite and non-negative, got ${w}`);
  if (!weights.some((w) => w > 0)) throw new CapacityError('expert cache split: every weight is 0 (at least one layer must have a positive weight)');
  if (total < L) {
    throw new CapacityError(`expert cache capacity too small: ${total} expert slot${total === 1 ? '' : 's'} for ${L} layers; every layer needs at least one slot (${L} slots)`);
  }
  const out = new Array<number>(L).fill(1);
  // Layers with a positive weight, by weight ascending (ties: layer order). Under one λ
  // the layers at the lower bound are a prefix of this order and those at the upper
  // bound a suffix, so the solution is found among the (prefix, suffix) pairs.
  const pos = weights.map((_, l) => l).filter((l) => weights[l] > 0).sort((a, b) => weights[a] - weights[b] || a - b);
  const zero = L - pos.length;
  const n = pos.length;
  const budget = Math.min(total, zero + n * experts);
  // prefix[i] = sum of the weights of pos[0..i-1].
  const prefix = new Float64Array(n + 1);
  for (let i = 0; i < n; i++) prefix[i + 1] = prefix[i] + weights[pos[i]];
  const W = prefix[n];
  const eps = 1e-12 * Math.max(1, W) * budget;
  let found: { a: number; b: number; R: number; Wmid: number } | null = null;
  for (let a = 0; a <= n && !found; a++) {
    for (let b = 0; a + b <= n; b++) {
      const R = budget - zero - a - b * experts; // slots of the middle layers
      const Wmid = prefix[n - b] - prefix[a];
      if (a + b === n) {
        // No middle layer: the bounds alone must make the budget, and some λ must put the
        // last lower-bound layer at or below 1 and the first upper-bound one at or above
        // experts: experts / w(first high) ≤ λ ≤ 1 / w(last low).
        if (R !== 0) continue;
        if (a > 0 && b > 0 && weights[pos[a]] < experts * weights[pos[a - 1]] - eps) continue;
        found = { a, b, R, Wmid: 0 };
        break;
      }
      if (R < n - a - b || R > (n - a - b) * experts) continue;
      // λ = R / Wmid; middle layers need 1 ≤ λw ≤ experts (only the ends of the range
      // matter), lower-bound layers λw ≤ 1, upper-bound ones λw ≥ experts.
      const lo = weights[pos[a]];
      const hi = weights[pos[n - b - 1]];
      if (R * lo < Wmid - eps || R * hi > experts * Wmid + eps) continue;
      if (a > 0 && R * weights[pos[a - 1]] > Wmid + eps) continue;
      if (b > 0 && R * weights[pos[n - b]] < experts * Wmid - eps) continue;
      found = { a, b, R, Wmid };
      break;
    }
  }
  if (!found) throw new Error(`expert cache split: no allocation found for ${total} slots over weights ${weights.join(',')} (a bug)`);
  const { a, b, R, Wmid } = found;
  for (let i = n - b; i < n; i++) out[pos[i]] = experts;
  if (a + b < n) {
    // Middle layers: floor of R × w / Wmid, then the leftover slots by largest remainder.
    const mid = pos.slice(a, n - b).sort((x, y) => x - y);
    const rem = new Map<number, number>();
    let given = 0;
    for (const l of mid) {
      const num = R * weights[l];
      let base = Math.floor(num / Wmid);
      if ((base + 1) * Wmid <= num) base++;
      if (base * Wmid > num) base--;
      base = Math.min(experts, Math.max(1, base));
      out[l] = base;
      rem.set(l, num - base * Wmid);
      given += base;
    }
    let left = R - given;
    const tol = 1e-9 * Wmid;
    const order = mid
      .filter((l) => out[l] < experts)
      .sort((x, y) => {
        const d = rem.get(y)! - rem.get(x)!;
        return Math.abs(d) > tol ? d : x - y;
      });
    for (let i = 0; left > 0 && i < order.length; i++, left--) out[order[i]]++;
    // Only rounding noise of fractional weights can leave a slot over or under: the
    // largest remainders take it, the smallest give it back.
    for (let i = order.length - 1; left < 0 && i >= 0; i--) if (out[order[i]] > 1) (out[order[i]]--, left++);
    if (left !== 0) throw new Error(`expert cache split: ${left} slot(s) left over for weights ${weights.join(',')} (a bug)`);
  }
  return out;
}

/**
 * Slots of each layer for a capacity and a split (setting texts or parsed). Equal: every
 * layer gets slotsPerLayer(capacity). Weights: the total budget (floor(fraction ×
 * experts) × layers, or floor(bytes / slot bytes)) divided by splitSlots. Throws
 * CapacityError for a budget below one slot per layer or a split that does not fit the
 * model (its number of weights).
 */
export function slotsByLayer(capacity: string | CapacitySpec, split: string | SplitSpec, shape: SlotShape): number[] {
  const c = typeof capacity === 'string' ? parseCapacity(capacity) : capacity;
  const sp = typeof split === 'string' ? parseSplit(split) : split;
  if (sp.kind === 'equal') return new Array<number>(shape.layers).fill(slotsPerLayer(c, shape));
  if (sp.weights.length !== shape.layers) {
    throw new CapacityError(`expert cache split ${JSON.stringify(sp.text)}: ${splitCountWhy(sp.weights.length, shape.layers)}; ${splitUsage(shape.layers)}`);
  }
  const total = c.kind === 'fraction' ? Math.floor(c.fraction * shape.experts + 1e-9) * shape.layers : Math.floor(c.bytes / shape.slotBytes);
  if (total < shape.layers) {
    const given = c.kind === 'fraction' ? `${c.fraction} of ${shape.experts} experts per layer` : `${c.bytes} bytes of ${shape.slotBytes}-byte expert slots`;
    throw new CapacityError(
      `expert cache capacity too small: ${given} gives ${total} expert slot${total === 1 ? '' : 's'} for ${shape.layers} layers; at least one slot per layer is needed ` +
        `(fraction ${(1 / shape.experts).toPrecision(3)}, or ${shape.layers * shape.slotBytes} bytes)`,
    );
  }
  return splitSlots(total, sp.weights, shape.experts);
}
