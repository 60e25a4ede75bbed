// Test/dev harness: runs a Python Worker in the offline workerd (miniflare 3, Pyodide 0.26.0a2).
// Reads one JSON config object from the file named by argv[2]; prints one JSON line
// {"ready": "http://host:port"} once the first request can be served, then serves until
// SIGTERM/SIGINT or stdin EOF (so a dying parent never leaves an orphan workerd behind).
import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { Log, LogLevel, Miniflare } from "miniflare";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const root = path.resolve(cfg.modulesRoot);
// Main module first: workerd treats the first module as the entry point. Python unless a
// module says otherwise (the benchmark's bare JS Worker is an ESModule).
const modules = cfg.modules.map((m) => ({
  type: m.type ?? "PythonModule",
  path: path.join(root, m.name),
  contents: readFileSync(m.file, "utf8"),
}));

const mf = new Miniflare({
  modules,
  modulesRoot: root,
  compatibilityDate: cfg.compatibilityDate,
  compatibilityFlags: cfg.compatibilityFlags,
  bindings: cfg.bindings,
  kvNamespaces: cfg.kvNamespaces,
  kvPersist: cfg.kvPersist ?? false,
  r2Buckets: cfg.r2Buckets ?? {},
  r2Persist: cfg.r2Persist ?? false,
  d1Databases: cfg.d1Databases ?? {},
  d1Persist: cfg.d1Persist ?? false,
  host: cfg.host ?? "127.0.0.1",
  port: cfg.port ?? 0,
  cf: false,
  // Per-request logging through Node costs a third of throughput; warnings are enough.
  log: new Log(cfg.verbose ? LogLevel.INFO : LogLevel.WARN),
  // workerLogs: false drains the Worker's stdout here instead of relaying every log line to
  // the parent process (benchmarks: in production logs never travel back to the caller).
  ...(cfg.workerLogs === false
    ? {
        handleRuntimeStdio(stdout, stderr) {
          stdout.resume();
          stderr.pipe(process.stderr);
        },
      }
    : {}),
});

let closing = false;
async function shutdown(code) {
  if (closing) return;
  closing = true;
  try {
    await mf.dispose();
  } finally {
    process.exit(code);
  }
}
process.on("SIGTERM", () => shutdown(0));
process.on("SIGINT", () => shutdown(0));
process.stdin.on("end", () => shutdown(0));
process.stdin.on("error", () => shutdown(0));
process.stdin.resume();

// D1 migrations, as `wrangler d1 migrations apply` does them (miniflare 3 has no
// migrations_dir): every *.sql of the binding's folder in name order, each in one batch with its
// row in d1_migrations, so a persisted dev database is migrated once and a half-applied file
// never counts as applied (statements split at ";", "--" comments dropped: no string literal
// in a migration may hold either). cfg.d1Migrations = { BINDING: "/abs/migrations" }.
function statements(sql) {
  return sql
    .split("\n")
    .map((line) => line.replace(/--.*$/, ""))
    .join("\n")
    .split(";")
    .map((s) => s.trim())
    .filter(Boolean);
}

async function migrate(binding, dir) {
  const db = await mf.getD1Database(binding);
  await db
    .prepare(
      "CREATE TABLE IF NOT EXISTS d1_migrations (id INTEGER PRIMARY KEY AUTOINCREMENT, " +
        "name TEXT UNIQUE, applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    )
    .run();
  const done = new Set(
    (await db.prepare("SELECT name FROM d1_migrations").all()).results.map((r) => r.name),
  );
  const applied = [];
  for (const name of readdirSync(dir).filter((f) => f.endsWith(".sql")).sort()) {
    if (done.has(name)) continue;
    const sql = statements(readFileSync(path.join(dir, name), "utf8"));
    await db.batch([
      ...sql.map((s) => db.prepare(s)),
      db.prepare("INSERT INTO d1_migrations (name) VALUES (?)").bind(name),
    ]);
    applied.push(name);
  }
  return applied;
}

try {
  const url = await mf.ready;
  for (const [binding, dir] of Object.entries(cfg.d1Migrations ?? {})) {
    const applied = await migrate(binding, dir);
    if (applied.length) {
      process.stderr.write(`runner: ${binding}: applied migrations ${applied.join(", ")}\n`);
    }
  }
  process.stdout.write(JSON.stringify({ ready: url.origin, pid: process.pid }) + "\n");
} catch (err) {
  process.stderr.write(`runner: workerd failed to start or migrate: ${err?.stack ?? err}\n`);
  await shutdown(1);
}
