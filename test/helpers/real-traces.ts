// The real routing traces the policy tests run on: ../shared/traces beside the project
// (the workplace's shared directory; see ../shared/traces/FORMAT.md). A checkout elsewhere
// fails these tests with the reason, not with a bare ENOENT from deep inside the loader.
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';

export const REAL_TRACES_DIR = resolve(import.meta.dirname, '..', '..', '..', 'shared', 'traces');

/** Path of the real trace `<name>.trace.csv`; throws, saying where it was looked for, if it is missing. */
export function realTrace(name: string): string {
  const path = join(REAL_TRACES_DIR, `${name}.trace.csv`);
  if (!existsSync(path)) {
    throw new Error(
      `real routing trace ${name}.trace.csv not found in ${REAL_TRACES_DIR}: the cache and batching tests evaluate policies on ` +
        `the real traces of shared/traces, read from beside the project (clone it next to shared/)`,
    );
  }
  return path;
}
