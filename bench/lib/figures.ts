/**
 * One measured figure of a benchmark's final JSON line: its value and unit, and the peer
 * or physical limit it is compared with (another figure's name or a description; null
 * when it stands alone).
 */
export interface Figure {
  name: string;
  value: number;
  unit: string;
  compared_to: string | null;
}
