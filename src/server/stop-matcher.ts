// Stop strings over streamed text. Text is fed as it is decoded; what is released is
// guaranteed not to be part of a stop string: a tail that could still grow into one is
// held back until the next piece decides it. The stop string itself is never released.

export interface StopResult {
  /** Text safe to send now. */
  text: string;
  /** True when a stop string was found; nothing after it (nor it) is ever released. */
  stopped: boolean;
}

export class StopMatcher {
  private pending = '';
  private done = false;
  private readonly stops: string[];
  private readonly longest: number;

  constructor(stops: readonly string[]) {
    // The empty string would match everywhere; OpenAI ignores it.
    this.stops = stops.filter((s) => s.length > 0);
    this.longest = this.stops.reduce((m, s) => Math.max(m, s.length), 0);
  }

  get stopped(): boolean {
    return this.done;
  }

  /** True while some decoded text is held back as a possible stop-string start. */
  get holding(): boolean {
    return this.pending.length > 0;
  }

  push(piece: string): StopResult {
    if (this.done) return { text: '', stopped: true };
    if (this.stops.length === 0) return { text: piece, stopped: false };
    this.pending += piece;
    // The earliest occurrence of any stop string wins.
    let cut = -1;
    for (const s of this.stops) {
      const i = this.pending.indexOf(s);
      if (i >= 0 && (cut < 0 || i < cut)) cut = i;
    }
    if (cut >= 0) {
      const text = this.pending.slice(0, cut);
      this.pending = '';
      this.done = true;
      return { text, stopped: true };
    }
    const hold = this.heldTail();
    const text = this.pending.slice(0, this.pending.length - hold);
    this.pending = this.pending.slice(this.pending.length - hold);
    return { text, stopped: false };
  }

  /** The end of the output: whatever was held back is not a stop string after all. */
  flush(): string {
    if (this.done) return '';
    const text = this.pending;
    this.pending = '';
    return text;
  }

  /** Length of the longest suffix of `pending` that is a proper prefix of a stop string. */
  private heldTail(): number {
    const max = Math.min(this.pending.length, this.longest - 1);
    for (let n = max; n > 0; n--) {
      const tail = this.pending.slice(this.pending.length - n);
      if (this.stops.some((s) => s.startsWith(tail))) return n;
    }
    return 0;
  }
}
