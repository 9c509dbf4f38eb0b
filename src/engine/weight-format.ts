import type { OpenedModel } from '../model/checkpoint.js';
import type { WeightFormat } from './native-runner.js';

/** The format matching the checkpoint's stored dtype, for `--weights auto`. */
export function storedFormat(m: OpenedModel): WeightFormat {
  const names = m.weights.names();
  const dtype = names.length > 0 ? m.weights.info(names[0]).dtype : 'F32';
  return dtype === 'BF16' ? 'bf16' : dtype === 'F16' ? 'f16' : 'f32';
}
