// KV block pool accounting: a fixed pool of blocks of `blockSize` token positions,
// handed to sequences as they grow and taken back all at once. The runner owns the
// memory behind the block ids; this only decides who holds which block. A request for
// more than the pool can give is refused whole (null), never partially served: the
// scheduler then preempts and asks again.

export class BlockManager {
  /** Free block ids; the most recently freed is reused first. */
  private readonly freeList: number[] = [];
  /** Each sequence's blocks in position order: block i holds positions [i*blockSize, (i+1)*blockSize). */
  private readonly tables = new Map<number, number[]>();

  constructor(
    readonly numBlocks: number,
    readonly blockSize: number,
  ) {
    if (!Number.isInteger(numBlocks) || numBlocks < 1) throw new Error(`the KV pool needs at least one block, got ${numBlocks}`);
    if (!Number.isInteger(blockSize) || blockSize < 1) throw new Error(`a KV block holds at least one token, got ${blockSize}`);
    for (let b = numBlocks - 1; b >= 0; b--) this.freeList.push(b);
  }

  /** Blocks needed to hold `numTokens` positions. */
  blocksFor(numTokens: number): number {
    return Math.ceil(numTokens / this.blockSize);
  }

  /**
   * Makes the sequence hold blocks for positions 0 .. numTokens-1, adding blocks as
   * needed (never removing). Returns its block table, or null, holding nothing more,
   * when the free blocks do not suffice.
   */
  allocate(seqId: number, numTokens: number): Int32Array | null {
    const table = this.tables.get(seqId) ?? [];
    const missing = this.blocksFor(numTokens) - table.length;
    if (missing > this.freeList.length) return null;
    for (let i = 0; i < missing; i++) table.push(this.freeList.pop()!);
    this.tables.set(seqId, table);
    return Int32Array.from(table);
  }

  /** Whether allocate(seqId, numTokens) would succeed now. */
  canAllocate(seqId: number, numTokens: number): boolean {
    const held = this.tables.get(seqId)?.length ?? 0;
    return this.blocksFor(numTokens) - held <= this.freeList.length;
  }

  /** The sequence's blocks in position order (a copy); empty when it holds none. */
  blockTable(seqId: number): Int32Array {
    return Int32Array.from(this.tables.get(seqId) ?? []);
  }

  /** Returns every block of the sequence to the pool; the number of blocks freed. */
  free(seqId: number): number {
    const table = this.tables.get(seqId);
    if (!table) return 0;
    this.tables.delete(seqId);
    // Reversed so that the sequence's first block is the next handed out.
    for (let i = table.length - 1; i >= 0; i--) this.freeList.push(table[i]);
    return table.length;
  }

  get usedBlocks(): number {
    return this.numBlocks - this.freeList.length;
  }

  get freeBlocks(): number {
    return this.freeList.length;
  }

  /** Fraction of the pool in use, 0 .. 1. */
  get usage(): number {
    return this.usedBlocks / this.numBlocks;
  }
}
