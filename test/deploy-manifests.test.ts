// deploy/: the Kubernetes manifests validated against the Kubernetes OpenAPI schemas
// (npm `kubernetes-models`, each object's validate()), and checked against the server
// and the image: probe paths and ports, grace period vs drainGraceSeconds, env names in
// config/settings.json, the model path under the image's /models, the HPA's metric in
// src/server/metrics.ts, the prometheus-adapter rule and the Prometheus scrape config
// (`promtool check config` when promtool is installed).
// Note: kubernetes-models' validate() checks types, enums and required fields, but like
// `kubectl apply` without --validate=strict it does not reject unknown field names; the
// fields that matter are therefore also read back explicitly below.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import t from 'tap';
import { parseAllDocuments, parse as parseYaml } from 'yaml';

import { ConfigMap } from 'kubernetes-models/v1/ConfigMap';
import { Service } from 'kubernetes-models/v1/Service';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { PodDisruptionBudget } from 'kubernetes-models/policy/v1/PodDisruptionBudget';
import { HorizontalPodAutoscaler } from 'kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler';

const ROOT = join(import.meta.dirname, '..');
const DEPLOY = join(ROOT, 'deploy');

type Obj = { apiVersion: string; kind: string; metadata: { name: string; labels?: Record<string, string> }; spec?: any; data?: Record<string, string> };

const MODELS: Record<string, new (data: any) => { validate(): void }> = {
  'v1/ConfigMap': ConfigMap,
  'v1/Service': Service,
  'apps/v1/Deployment': Deployment,
  'policy/v1/PodDisruptionBudget': PodDisruptionBudget,
  'autoscaling/v2/HorizontalPodAutoscaler': HorizontalPodAutoscaler,
};

function readDocs(file: string): Obj[] {
  const docs = parseAllDocuments(readFileSync(file, 'utf8'));
  for (const d of docs) if (d.errors.length > 0) throw new Error(`${file}: ${d.errors.map((e) => e.message).join('; ')}`);
  return docs.map((d) => d.toJS() as Obj).filter((o) => o !== null);
}

/** The objects of a kustomization (plain resource lists only: no patches to apply). */
function kustomization(dir: string): { file: string; obj: Obj }[] {
  const k = parseYaml(readFileSync(join(dir, 'kustomization.yaml'), 'utf8')) as { resources: string[]; patches?: unknown; labels?: { pairs: Record<string, string> }[] };
  if (k.patches) throw new Error(`${dir}: patches are not expanded by this test`);
  return k.resources.flatMap((r) => readDocs(join(dir, r)).map((obj) => ({ file: join(dir, r), obj })));
}

const settings = (JSON.parse(readFileSync(join(ROOT, 'config', 'settings.json'), 'utf8')) as { settings: { key: string; env: string; default: unknown }[] }).settings;
const settingEnv = new Map(settings.map((s) => [s.env, s]));
const dockerfile = readFileSync(join(ROOT, 'Dockerfile'), 'utf8');
const metricsSource = readFileSync(join(ROOT, 'src', 'server', 'metrics.ts'), 'utf8');
const metricNames = new Set([...metricsSource.matchAll(/['"](moe_[a-z0-9_]+)['"]/g)].map((m) => m[1]));

t.test('kubernetes-models validates', async (t) => {
  // A sanity check that validate() rejects a wrong object at all.
  t.throws(() => new Deployment({ metadata: { name: 'x' }, spec: { replicas: 'two' } } as any).validate(), 'a Deployment with replicas: "two" is rejected');
});

for (const variant of ['cpu', 'gpu'] as const) {
  t.test(`deploy/kubernetes/${variant}`, async (t) => {
    const objs = kustomization(join(DEPLOY, 'kubernetes', variant));
    const kinds = objs.map((o) => o.obj.kind).sort();
    t.same(kinds, ['Deployment', 'HorizontalPodAutoscaler', 'PodDisruptionBudget', 'Service'], 'Deployment, Service, PDB and HPA');
    for (const { file, obj } of objs) {
      const Model = MODELS[`${obj.apiVersion}/${obj.kind}`];
      t.ok(Model, `${obj.apiVersion} ${obj.kind} is a known, current API version`);
      if (!Model) continue;
      t.doesNotThrow(() => new Model(obj).validate(), `${file.slice(ROOT.length + 1)}: ${obj.kind} ${obj.metadata.name} validates against the Kubernetes schema`);
    }
    const get = (kind: string) => objs.find((o) => o.obj.kind === kind)!.obj;
    const dep = get('Deployment');
    const pod = dep.spec.template.spec;
    const c = pod.containers[0];
    const env = new Map<string, string>(c.env.map((e: { name: string; value: string }) => [e.name, e.value]));

    // Environment: every MOE_SERVE_* variable is a setting, and each value is valid for it.
    for (const name of env.keys()) t.ok(settingEnv.has(name), `env ${name} is a setting in config/settings.json`);
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', `
      import { loadSettings } from ${JSON.stringify(join(ROOT, 'src', 'config.ts'))};
      process.stdout.write(JSON.stringify(loadSettings({ env: JSON.parse(process.env.DEPLOY_ENV) })));`], {
      encoding: 'utf8',
      env: { ...process.env, DEPLOY_ENV: JSON.stringify(Object.fromEntries(env)) },
    });
    t.equal(r.status, 0, `src/config.ts accepts the Deployment's environment ${r.stderr.trim()}`);
    const loaded = r.status === 0 ? (JSON.parse(r.stdout) as { port: number; host: string; drainGraceSeconds: number; model: string }) : null;

    // The model under the image's documented mount point.
    const modelsMount = c.volumeMounts.find((m: { name: string }) => m.name === 'models');
    t.equal(modelsMount?.mountPath, '/models', 'the models volume is mounted at /models');
    t.ok(modelsMount?.readOnly, 'read-only');
    t.match(dockerfile, /mkdir -p \/models /, 'the image creates /models');
    t.match(env.get('MOE_SERVE_MODEL') ?? '', /^\/models\/[^/]+/, 'MOE_SERVE_MODEL is a directory under /models');
    t.equal(env.get('MOE_SERVE_CACHE_DIR'), '/var/cache/moe-serve', 'the cache dir is the image one');
    t.match(dockerfile, /MOE_SERVE_CACHE_DIR=\/var\/cache\/moe-serve/, 'the image sets the same cache dir');
    t.ok(c.volumeMounts.some((m: { mountPath: string }) => m.mountPath === '/var/cache/moe-serve'), 'the cache dir is a writable volume (read-only root filesystem)');

    // Ports and probes match the server.
    const port = loaded?.port ?? Number(env.get('MOE_SERVE_PORT'));
    t.equal(loaded?.host, '0.0.0.0', 'listens on all interfaces');
    const http = c.ports.find((p: { name: string }) => p.name === 'http');
    t.equal(http?.containerPort, port, 'containerPort "http" is MOE_SERVE_PORT');
    t.match(dockerfile, new RegExp(`EXPOSE ${port}\\b`), 'the image exposes the same port');
    const probePort = (p: { httpGet: { port: string | number } }) => (p.httpGet.port === 'http' ? port : p.httpGet.port);
    t.equal(c.livenessProbe.httpGet.path, '/health', 'liveness: /health');
    t.equal(probePort(c.livenessProbe), port, 'liveness port');
    t.equal(c.readinessProbe.httpGet.path, '/ready', 'readiness: /ready');
    t.equal(probePort(c.readinessProbe), port, 'readiness port');
    t.equal(c.startupProbe.httpGet.path, '/health', 'startup: /health (answers while the model loads)');
    const svc = get('Service');
    t.equal(svc.spec.ports[0].targetPort, 'http', 'the Service targets the http port');
    t.same(svc.spec.selector, Object.fromEntries(Object.entries(dep.spec.selector.matchLabels)), 'the Service selects the Deployment\'s pods');
    t.same(get('PodDisruptionBudget').spec.selector.matchLabels, dep.spec.selector.matchLabels, 'the PDB selects them too');
    t.ok(dep.spec.replicas >= 2, 'at least two replicas (the PDB can then allow one down)');

    // Shutdown: the grace period covers preStop + drainGraceSeconds + a margin.
    const drain = loaded?.drainGraceSeconds ?? Number(settings.find((s) => s.key === 'drainGraceSeconds')!.default);
    const preStop = c.lifecycle?.preStop?.exec?.command?.[0] === 'sleep' ? Number(c.lifecycle.preStop.exec.command[1]) : 0;
    t.ok(pod.terminationGracePeriodSeconds >= preStop + drain + 5, `terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds} >= preStop ${preStop} + drainGraceSeconds ${drain} + 5`);

    // Non-root, as the image.
    t.match(dockerfile, /USER 10001:10001/, 'the image runs as 10001');
    t.equal(pod.securityContext.runAsUser, 10001, 'runAsUser 10001');
    t.ok(pod.securityContext.runAsNonRoot, 'runAsNonRoot');

    // Resources; the GPU variant asks for a GPU, the CPU one must not.
    const res = c.resources;
    t.ok(res.requests.cpu && res.requests.memory && res.limits.cpu && res.limits.memory, 'cpu and memory requests and limits');
    if (variant === 'gpu') {
      t.equal(String(res.limits['nvidia.com/gpu']), '1', 'limits nvidia.com/gpu: 1');
      t.match(c.image, /cuda/, 'the CUDA image');
    } else {
      t.notOk(res.limits['nvidia.com/gpu'] ?? res.requests['nvidia.com/gpu'], 'no GPU');
      t.match(c.image, /cpu/, 'the CPU image');
    }

    // Scrape annotations point at /metrics on the server's port.
    const ann = dep.spec.template.metadata.annotations;
    t.equal(ann['prometheus.io/scrape'], 'true');
    t.equal(Number(ann['prometheus.io/port']), port, 'prometheus.io/port');
    t.equal(ann['prometheus.io/path'], '/metrics', 'prometheus.io/path');

    // The autoscaler scales this Deployment on a metric the server exports.
    const hpa = get('HorizontalPodAutoscaler');
    t.same(hpa.spec.scaleTargetRef, { apiVersion: 'apps/v1', kind: 'Deployment', name: dep.metadata.name }, 'the HPA targets the Deployment');
    for (const m of hpa.spec.metrics) {
      const name = m.pods?.metric?.name ?? m.object?.metric?.name ?? m.external?.metric?.name;
      t.ok(metricNames.has(name), `HPA metric ${name} is defined in src/server/metrics.ts`);
    }
    t.ok(hpa.spec.minReplicas >= 2, 'HPA keeps at least two replicas');
  });
}

t.test('prometheus-adapter rule serves the HPA metric', async (t) => {
  const [cm] = readDocs(join(DEPLOY, 'prometheus', 'prometheus-adapter-rules.yaml'));
  t.doesNotThrow(() => new ConfigMap(cm as any).validate(), 'the ConfigMap validates');
  const cfg = parseYaml(cm.data!['config.yaml']) as { rules: { seriesQuery: string; name: { as: string; matches: string }; metricsQuery: string; resources: { overrides: Record<string, { resource: string }> } }[] };
  const hpa = readDocs(join(DEPLOY, 'kubernetes', 'common', 'hpa.yaml'))[0];
  for (const m of hpa.spec.metrics) {
    const name = m.pods.metric.name;
    const rule = cfg.rules.find((r) => r.name.as === name);
    t.ok(rule, `a rule exposes ${name}`);
    if (!rule) continue;
    t.match(rule.seriesQuery, new RegExp(`^${name}\\{`), 'it selects the series by that name');
    t.ok(new RegExp(rule.name.matches).test(name), 'name.matches matches it');
    t.same(rule.resources.overrides, { namespace: { resource: 'namespace' }, pod: { resource: 'pod' } }, 'namespace and pod labels map to the pod');
    t.match(rule.metricsQuery, /<<\.Series>>\{<<\.LabelMatchers>>\}/, 'the query uses the adapter placeholders');
  }
  for (const r of cfg.rules) t.ok(metricNames.has(r.name.as), `${r.name.as} is defined in src/server/metrics.ts`);
});

t.test('Prometheus scrape config', async (t) => {
  const file = join(DEPLOY, 'prometheus', 'prometheus.yml');
  const cfg = parseYaml(readFileSync(file, 'utf8')) as { scrape_configs: { job_name: string; relabel_configs: { target_label?: string }[]; kubernetes_sd_configs?: unknown }[] };
  const job = cfg.scrape_configs.find((j) => j.job_name === 'moe-serve');
  t.ok(job, 'a moe-serve job');
  const targets = new Set(job!.relabel_configs.map((r) => r.target_label));
  t.ok(targets.has('namespace') && targets.has('pod'), 'keeps the namespace and pod labels the adapter rule maps');
  t.ok(targets.has('__metrics_path__') && targets.has('__address__'), 'honours the path and port annotations');

  const promtool = (process.env.PATH ?? '').split(':').map((d) => join(d, 'promtool')).find((p) => existsSync(p));
  if (!promtool) {
    t.comment('promtool is not installed (apt-get install prometheus): `promtool check config` skipped');
    return;
  }
  let r = spawnSync(promtool, ['check', 'config', file], { encoding: 'utf8' });
  if (r.status !== 0 && /field kubernetes_sd_configs not found/.test(r.stdout + r.stderr)) {
    // Debian's prometheus is built without Kubernetes service discovery, so its promtool
    // does not know kubernetes_sd_configs. Check everything else (relabelling regexes,
    // intervals) with the discovery swapped for a static target.
    t.comment("this promtool has no kubernetes_sd_configs (Debian's build): checking the rest with static_configs");
    const dir = mkdtempSync(join(tmpdir(), 'moe-prom-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const swapped = readFileSync(file, 'utf8').replace(/kubernetes_sd_configs:\n\s+- role: pod/, "static_configs:\n      - targets: ['127.0.0.1:8000']");
    writeFileSync(join(dir, 'prometheus.yml'), swapped);
    r = spawnSync(promtool, ['check', 'config', join(dir, 'prometheus.yml')], { encoding: 'utf8', cwd: dirname(file) });
  }
  t.equal(r.status, 0, `promtool check config: ${(r.stdout + r.stderr).trim()}`);
});
