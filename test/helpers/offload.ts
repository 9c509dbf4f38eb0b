import { loadNative } from '../../src/engine/native.js';

/** Whether this build of the addon has the expert store and pre-gating. */
export function nativeOffload(): boolean {
  try {
    const proto = loadNative().NativeEngine.prototype as unknown as Record<string, unknown>;
    return typeof proto.predictRouter === 'function' && typeof proto.loadExpert === 'function';
  } catch {
    return false;
  }
}

/** A tap `skip` option for tests that need the native expert store. */
export const NO_OFFLOAD_SKIP: false | string = nativeOffload() ? false : 'this build of the addon has no expert store yet';
