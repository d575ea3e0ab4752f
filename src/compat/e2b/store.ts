/**
 * What the E2B surface remembers per sandbox (table `e2b_sandboxes`, migration 4): the template
 * as the client named it, metadata, default environment variables, E2B's timeout (`end_at`) and
 * lifecycle (auto-pause, auto-resume), and whether the sandbox was paused through E2B. The
 * sandbox itself is a Cocoon microVM with the same id.
 */
import type { Db } from '../../store/sql.ts';
import { boolColumn, rowMapper } from '../../store/rows.ts';

export interface E2bSandbox {
  microvmId: string;
  tenantId: string;
  templateId: string;
  alias: string | null;
  metadata: Record<string, string>;
  envs: Record<string, string>;
  autoPause: boolean;
  autoResume: boolean;
  paused: boolean;
  startedAt: string;
  endAt: string;
}

interface Row {
  microvm_id: string;
  tenant_id: string;
  template_id: string;
  alias: string | null;
  metadata: string;
  envs: string;
  auto_pause: number;
  auto_resume: number;
  paused: number;
  started_at: string;
  end_at: string;
}

function strings(text: string): Record<string, string> {
  try {
    const value = JSON.parse(text) as unknown;
    if (value && typeof value === 'object' && !Array.isArray(value)) {
      return Object.fromEntries(Object.entries(value).filter((e): e is [string, string] => typeof e[1] === 'string'));
    }
  } catch {
    // a damaged row reads as empty
  }
  return {};
}

const toSandbox = rowMapper<Row, E2bSandbox>({
  microvmId: 'microvm_id', tenantId: 'tenant_id', templateId: 'template_id', alias: 'alias',
  metadata: (row) => strings(row.metadata), envs: (row) => strings(row.envs),
  autoPause: boolColumn('auto_pause'), autoResume: boolColumn('auto_resume'), paused: boolColumn('paused'),
  startedAt: 'started_at', endAt: 'end_at',
});

export async function insertSandbox(db: Db, s: E2bSandbox): Promise<void> {
  await db.run(
    `INSERT INTO e2b_sandboxes (microvm_id, tenant_id, template_id, alias, metadata, envs, auto_pause, auto_resume, paused, started_at, end_at)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    [s.microvmId, s.tenantId, s.templateId, s.alias, JSON.stringify(s.metadata), JSON.stringify(s.envs), s.autoPause, s.autoResume, s.paused, s.startedAt, s.endAt],
  );
}

export async function getSandbox(db: Db, microvmId: string): Promise<E2bSandbox | undefined> {
  const row = await db.get<Row>('SELECT * FROM e2b_sandboxes WHERE microvm_id = ?', [microvmId]);
  return row && toSandbox(row);
}

export async function getTenantSandbox(db: Db, tenantId: string, microvmId: string): Promise<E2bSandbox | undefined> {
  const row = await db.get<Row>('SELECT * FROM e2b_sandboxes WHERE tenant_id = ? AND microvm_id = ?', [tenantId, microvmId]);
  return row && toSandbox(row);
}

export async function listTenantSandboxes(db: Db, tenantId: string): Promise<E2bSandbox[]> {
  const rows = await db.all<Row>('SELECT * FROM e2b_sandboxes WHERE tenant_id = ? ORDER BY microvm_id DESC', [tenantId]);
  return rows.map(toSandbox);
}

export async function listAllSandboxes(db: Db): Promise<E2bSandbox[]> {
  return (await db.all<Row>('SELECT * FROM e2b_sandboxes')).map(toSandbox);
}

export async function setSandboxEnd(db: Db, microvmId: string, endAt: string): Promise<void> {
  await db.run('UPDATE e2b_sandboxes SET end_at = ? WHERE microvm_id = ?', [endAt, microvmId]);
}

export async function setSandboxPaused(db: Db, microvmId: string, paused: boolean): Promise<void> {
  await db.run('UPDATE e2b_sandboxes SET paused = ? WHERE microvm_id = ?', [paused, microvmId]);
}

export async function deleteSandbox(db: Db, microvmId: string): Promise<void> {
  await db.run('DELETE FROM e2b_sandboxes WHERE microvm_id = ?', [microvmId]);
}
