import { CocoonError } from '../common/errors.ts';
import type { SqliteDb } from './sqlite.ts';

/**
 * One schema step. Steps run inside a transaction with foreign keys on; a step that must
 * rebuild a table (SQLite's way to change a column) needs `PRAGMA foreign_keys` off, which
 * SQLite ignores inside a transaction: give `migrate` a way to run such a step when one comes.
 */
export interface Migration {
  /** 1, 2, 3… in order; never renumber or edit one that has shipped, add a new one. */
  version: number;
  name: string;
  sql: string;
}

const IMAGE_STATES = "('PENDING','BUILDING','BOOTING','SNAPSHOTTING','READY','FAILED')";
const MICROVM_STATES = "('PENDING','RUNNING','SUSPENDING','SUSPENDED','RESUMING','TERMINATING','TERMINATED','FAILED')";

/**
 * The SQLite schema, as an ordered list of steps. Times are ISO-8601 UTC strings with
 * milliseconds (`2026-01-02T03:04:05.678Z`): fixed width, so they compare correctly as text;
 * booleans are 0/1; JSON columns hold objects or arrays as text. CHECK constraints repeat the
 * platform's limits so that a bug upstream cannot store an impossible row.
 */
export const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    name: 'initial schema',
    sql: `
      CREATE TABLE tenants (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        account_id  TEXT NOT NULL UNIQUE,
        is_admin    INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
        created_at  TEXT NOT NULL
      );

      CREATE TABLE api_keys (
        id            TEXT PRIMARY KEY,
        tenant_id     TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        name          TEXT,
        key_prefix    TEXT NOT NULL,
        key_hash      TEXT NOT NULL UNIQUE,
        created_at    TEXT NOT NULL,
        last_used_at  TEXT,
        revoked_at    TEXT
      );
      CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, id);

      CREATE TABLE bundles (
        id          TEXT PRIMARY KEY,
        tenant_id   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        sha256      TEXT NOT NULL CHECK (length(sha256) = 64),
        format      TEXT NOT NULL CHECK (format IN ('tar.gz', 'zip')),
        size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
        uri         TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        UNIQUE (tenant_id, sha256)
      );

      -- The last version handed out per image name, so a version is never reused even after
      -- the image that had it was deleted (ARNs stay unique forever).
      CREATE TABLE image_versions (
        tenant_id     TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        last_version  INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, name)
      );

      CREATE TABLE images (
        id                         TEXT PRIMARY KEY,
        tenant_id                  TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        name                       TEXT NOT NULL,
        version                    INTEGER NOT NULL CHECK (version >= 1),
        arn                        TEXT NOT NULL UNIQUE,
        state                      TEXT NOT NULL CHECK (state IN ${IMAGE_STATES}),
        error                      TEXT,
        bundle_uri                 TEXT NOT NULL,
        bundle_sha256              TEXT,
        vcpus                      INTEGER NOT NULL CHECK (vcpus BETWEEN 1 AND 16),
        memory_mib                 INTEGER NOT NULL CHECK (memory_mib BETWEEN 128 AND 32768),
        disk_mib                   INTEGER NOT NULL CHECK (disk_mib BETWEEN 1 AND 32768),
        port                       INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        readiness_http_path        TEXT,
        readiness_timeout_seconds  INTEGER NOT NULL CHECK (readiness_timeout_seconds BETWEEN 1 AND 3600),
        network_egress             INTEGER NOT NULL DEFAULT 0 CHECK (network_egress IN (0, 1)),
        build_log_path             TEXT,
        artifacts                  TEXT NOT NULL DEFAULT '{}',
        created_at                 TEXT NOT NULL,
        updated_at                 TEXT NOT NULL,
        UNIQUE (tenant_id, name, version)
      );
      CREATE INDEX images_by_tenant ON images (tenant_id, id);
      CREATE INDEX images_by_tenant_state ON images (tenant_id, state, id);
      CREATE INDEX images_by_state ON images (state);

      CREATE TABLE microvms (
        id                          TEXT PRIMARY KEY,
        tenant_id                   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        -- NULL once the image is deleted; image_arn keeps saying what it was.
        image_id                    TEXT REFERENCES images(id) ON DELETE SET NULL,
        image_arn                   TEXT NOT NULL,
        arn                         TEXT NOT NULL UNIQUE,
        state                       TEXT NOT NULL CHECK (state IN ${MICROVM_STATES}),
        error                       TEXT,
        vcpus                       INTEGER NOT NULL CHECK (vcpus BETWEEN 1 AND 16),
        memory_mib                  INTEGER NOT NULL CHECK (memory_mib BETWEEN 128 AND 32768),
        disk_mib                    INTEGER NOT NULL CHECK (disk_mib BETWEEN 1 AND 32768),
        port                        INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        auto_resume_enabled         INTEGER NOT NULL CHECK (auto_resume_enabled IN (0, 1)),
        max_idle_duration_seconds   INTEGER NOT NULL CHECK (max_idle_duration_seconds >= 1),
        suspended_duration_seconds  INTEGER CHECK (suspended_duration_seconds IS NULL OR suspended_duration_seconds >= 1),
        maximum_duration_seconds    INTEGER NOT NULL CHECK (maximum_duration_seconds BETWEEN 1 AND 28800),
        network_egress              INTEGER NOT NULL DEFAULT 0 CHECK (network_egress IN (0, 1)),
        client_token                TEXT,
        client_request_hash         TEXT,
        runtime                     TEXT NOT NULL DEFAULT '{}',
        created_at                  TEXT NOT NULL,
        updated_at                  TEXT NOT NULL,
        expires_at                  TEXT NOT NULL,
        last_activity_at            TEXT NOT NULL,
        suspended_at                TEXT,
        terminated_at               TEXT
      );
      CREATE UNIQUE INDEX microvms_by_client_token ON microvms (tenant_id, client_token) WHERE client_token IS NOT NULL;
      CREATE INDEX microvms_by_tenant ON microvms (tenant_id, id);
      CREATE INDEX microvms_by_tenant_state ON microvms (tenant_id, state, id);
      CREATE INDEX microvms_by_image ON microvms (image_id, state);
      CREATE INDEX microvms_by_state ON microvms (state, id);

      CREATE TABLE tokens (
        id             TEXT PRIMARY KEY,
        microvm_id     TEXT NOT NULL REFERENCES microvms(id) ON DELETE CASCADE,
        tenant_id      TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        token_hash     TEXT NOT NULL UNIQUE,
        allowed_ports  TEXT,
        created_at     TEXT NOT NULL,
        expires_at     TEXT NOT NULL,
        revoked_at     TEXT
      );
      CREATE INDEX tokens_by_microvm ON tokens (microvm_id, id);
      CREATE INDEX tokens_by_expiry ON tokens (expires_at);

      CREATE TABLE events (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant_id      TEXT REFERENCES tenants(id) ON DELETE CASCADE,
        resource_type  TEXT NOT NULL CHECK (resource_type IN ('tenant', 'image', 'microvm')),
        resource_id    TEXT NOT NULL,
        type           TEXT NOT NULL,
        from_state     TEXT,
        to_state       TEXT,
        message        TEXT,
        data           TEXT,
        created_at     TEXT NOT NULL
      );
      CREATE INDEX events_by_resource ON events (resource_type, resource_id, id);
      CREATE INDEX events_by_tenant ON events (tenant_id, id);
    `,
  },
  {
    version: 2,
    name: 'image hooks',
    // Guest hooks of an image (run, suspend, resume, terminate): {"<name>": {"command", "timeoutSeconds"}}.
    sql: `ALTER TABLE images ADD COLUMN hooks TEXT NOT NULL DEFAULT '{}';`,
  },
  {
    version: 3,
    name: 'shell tokens and images without an app port',
    // scope: what a token opens through the gateway: 'http' (app requests) or 'shell' (/.cocoon/shell).
    // has_app_port 0: an image with "port": null (its port column then holds a placeholder).
    sql: `ALTER TABLE tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'http' CHECK (scope IN ('http', 'shell'));
          ALTER TABLE images ADD COLUMN has_app_port INTEGER NOT NULL DEFAULT 1 CHECK (has_app_port IN (0, 1));
          ALTER TABLE microvms ADD COLUMN has_app_port INTEGER NOT NULL DEFAULT 1 CHECK (has_app_port IN (0, 1));`,
  },
  {
    version: 4,
    name: 'e2b sandboxes',
    // A microVM started through the E2B surface (src/compat/e2b/): what E2B clients set and see.
    // end_at: E2B's timeout (kill, or pause when auto_pause); paused: paused through E2B (an
    // idle suspend by Cocoon stays invisible and is not recorded here).
    sql: `CREATE TABLE e2b_sandboxes (
            microvm_id   TEXT PRIMARY KEY REFERENCES microvms (id) ON DELETE CASCADE,
            tenant_id    TEXT NOT NULL,
            template_id  TEXT NOT NULL,
            alias        TEXT,
            metadata     TEXT NOT NULL DEFAULT '{}',
            envs         TEXT NOT NULL DEFAULT '{}',
            auto_pause   INTEGER NOT NULL DEFAULT 0 CHECK (auto_pause IN (0, 1)),
            auto_resume  INTEGER NOT NULL DEFAULT 0 CHECK (auto_resume IN (0, 1)),
            paused       INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
            started_at   TEXT NOT NULL,
            end_at       TEXT NOT NULL
          );
          CREATE INDEX e2b_sandboxes_by_tenant ON e2b_sandboxes (tenant_id, microvm_id);`,
  },
  {
    version: 5,
    name: 'sealed api key secrets',
    // AWS SigV4 (src/compat/aws/) signs with the API key itself: a copy sealed with AES-256-GCM
    // under the data directory's key file (sealed-secrets.ts). NULL for keys made before this
    // step: those cannot sign AWS requests (the API says to make a new key).
    sql: `ALTER TABLE api_keys ADD COLUMN sealed_secret TEXT;`,
  },
  {
    version: 6,
    name: 'aws http hooks',
    // http_hooks: an image's AWS-style HTTP hooks, JSON {"port", "<name>": {"timeoutSeconds"}}; NULL: none.
    // run_hook_payload: the body of a microVM's POST /run (RunMicrovm's runHookPayload, sensitive),
    // kept until the run hook was sent (a launch interrupted by a crash sends it again), then NULL.
    sql: `ALTER TABLE images ADD COLUMN http_hooks TEXT;
          ALTER TABLE microvms ADD COLUMN run_hook_payload TEXT;`,
  },
  {
    version: 7,
    name: 'microvm host',
    // host_id: the host (COCOON_HOST_ID) whose lifecycle runs the microVM: its recovery and its
    // timers touch only its own rows. NULL: not claimed yet (a PENDING microVM before its
    // launch, or a row from before this step, which the first host to recover claims).
    sql: `ALTER TABLE microvms ADD COLUMN host_id TEXT;
          CREATE INDEX microvms_by_host ON microvms (host_id, state);`,
  },
];

export interface MigrationReport {
  /** Versions applied by this call, in order (empty when the schema was current). */
  applied: number[];
  /** The schema version now. */
  version: number;
}

/**
 * Brings the database to the newest schema. Idempotent: applied versions are recorded in
 * `schema_migrations` and skipped. All pending steps run in one transaction, so a failure
 * leaves the schema as it was. A database from a newer Cocoon is refused rather than guessed at.
 */
export async function migrate(db: SqliteDb, migrations: readonly Migration[] = MIGRATIONS): Promise<MigrationReport> {
  checkOrder(migrations);
  return db.transaction(async (tx) => {
    db.execNow(`
      CREATE TABLE IF NOT EXISTS schema_migrations (
        version     INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        applied_at  TEXT NOT NULL
      )
    `);
    const rows = await tx.all<{ version: number; name: string }>('SELECT version, name FROM schema_migrations ORDER BY version');
    const known = new Map(migrations.map((m) => [m.version, m]));
    for (const row of rows) {
      const migration = known.get(row.version);
      if (migration === undefined) {
        throw new CocoonError(
          'database_too_new',
          `the database at ${db.path} has schema version ${row.version}, which this Cocoon does not know; ` +
            'run a newer Cocoon or restore a backup',
        );
      }
      if (migration.name !== row.name) {
        throw new CocoonError(
          'database_schema_mismatch',
          `schema version ${row.version} in ${db.path} is '${row.name}', expected '${migration.name}'`,
        );
      }
    }
    const done = new Set(rows.map((r) => r.version));
    const applied: number[] = [];
    for (const migration of migrations) {
      if (done.has(migration.version)) continue;
      db.execNow(migration.sql);
      await tx.run('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)', [
        migration.version, migration.name, new Date().toISOString(),
      ]);
      applied.push(migration.version);
    }
    const last = migrations.at(-1)?.version ?? 0;
    return { applied, version: Math.max(last, ...rows.map((r) => r.version)) };
  });
}

function checkOrder(migrations: readonly Migration[]): void {
  migrations.forEach((migration, index) => {
    if (migration.version !== index + 1) {
      throw new Error(`migration #${index} has version ${migration.version}; versions must be 1, 2, 3… in order`);
    }
  });
}
