// The README's configuration reference is generated from config/settings.json by
// scripts/gen-config-table.mjs; this fails when the two drift apart.

import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';

const ROOT = join(import.meta.dirname, '..');
const SCRIPT = join(ROOT, 'scripts', 'gen-config-table.mjs');

t.test("README.md's settings table matches config/settings.json", async (t) => {
  const r = spawnSync(process.execPath, [SCRIPT, '--check'], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr.trim() || r.stdout.trim());
});

t.test('the table has one row per setting with its default, env variable and flag', async (t) => {
  const schema = JSON.parse(readFileSync(join(ROOT, 'config', 'settings.json'), 'utf8')) as {
    settings: { key: string; env: string; flag: string; default: unknown }[];
  };
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const begin = readme.indexOf('<!-- BEGIN settings table');
  const end = readme.indexOf('<!-- END settings table -->');
  t.ok(begin >= 0 && end > begin, 'the markers are in README.md');
  const rows = readme
    .slice(begin, end)
    .split('\n')
    .filter((l) => l.startsWith('| `'));
  t.equal(rows.length, schema.settings.length, 'one row per setting');
  for (const s of schema.settings) {
    const row = rows.find((l) => l.startsWith(`| \`${s.key}\` |`));
    t.ok(row, `row for ${s.key}`);
    if (!row) continue;
    t.ok(row.includes(`\`${s.env}\``), `${s.key}: env ${s.env}`);
    if (s.flag) t.ok(row.includes(`\`${s.flag}\``), `${s.key}: flag ${s.flag}`);
  }
});

t.test('the generator prints the same table it writes', async (t) => {
  const r = spawnSync(process.execPath, [SCRIPT], { encoding: 'utf8' });
  t.equal(r.status, 0);
  t.ok(readFileSync(join(ROOT, 'README.md'), 'utf8').includes(r.stdout.trim()), 'README.md contains the printed table');
});
