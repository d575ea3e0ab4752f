/**
 * The microVM operations on Cocoon's microVM service and microVM store: run, get, list,
 * suspend, resume, terminate. A microVM's id is Cocoon's (`mvm-…`); its endpoint is its host on
 * the gateway (`<id>.<gateway domain>:<gateway port>`), where requests carry `X-aws-proxy-auth`.
 */
import { encodeCursor } from '../../store/pagination.ts';
import { createHash } from 'node:crypto';
import { MAX_SESSION_SECONDS, findTenantMicrovm, listMicrovms, type IdlePolicy, type Microvm } from '../../store/microvms.ts';
import type { Tenant } from '../../store/tenants.ts';
import type { AwsRequest, AwsServices } from './context.ts';
import { conflict, notFound, validation } from './errors.ts';
import { latestActive, resolveImage, statusOf } from './images.ts';
import { MAX_RESULTS } from './pagination.ts';
import { awsImageArn, epoch, imageNameAndVersion, microvmState, microvmStateReason } from './shapes.ts';
import { type Json, bool, int, isObject, onlyMembers, queryInt, queryString, str, stringList, struct } from './validate.ts';

const IDENTIFIER = { required: true, min: 1, max: 256 } as const;

export function endpointOf(services: AwsServices, microvm: Microvm): string {
  return `${microvm.id}.${services.config.gatewayDomain}:${services.gatewayPort()}`;
}

export function microvmView(services: AwsServices, tenant: Tenant, microvm: Microvm) {
  const { name, version } = imageNameAndVersion(microvm.imageArn);
  const reason = microvmStateReason(microvm);
  return {
    microvmId: microvm.id,
    state: microvmState(microvm.state),
    endpoint: endpointOf(services, microvm),
    imageArn: awsImageArn(services.config.region, tenant.accountId, name),
    imageVersion: version,
    idlePolicy: {
      maxIdleDurationSeconds: microvm.idlePolicy.maxIdleDurationSeconds,
      // null in Cocoon: suspended until the session ends, i.e. at most the session's length.
      suspendedDurationSeconds: microvm.idlePolicy.suspendedDurationSeconds ?? microvm.maximumDurationSeconds,
      autoResumeEnabled: microvm.idlePolicy.autoResumeEnabled,
    },
    maximumDurationInSeconds: microvm.maximumDurationSeconds,
    startedAt: epoch(microvm.createdAt),
    ...(microvm.terminatedAt ? { terminatedAt: epoch(microvm.terminatedAt) } : {}),
    ...(reason ? { stateReason: reason } : {}),
    ingressNetworkConnectors: [],
    egressNetworkConnectors: [],
  };
}

/** A microvmIdentifier of this tenant's (id or Cocoon ARN); another tenant's answers like a missing one. */
export async function findMicrovm(services: AwsServices, tenant: Tenant, identifier: string): Promise<Microvm> {
  const microvm = await findTenantMicrovm(services.db, tenant.id, identifier);
  if (!microvm) throw notFound('Microvm', identifier);
  return microvm;
}

export async function getMicrovm(services: AwsServices, request: AwsRequest) {
  const microvm = await findMicrovm(services, request.tenant, str(request.params, 'microvmIdentifier', IDENTIFIER));
  return { body: microvmView(services, request.tenant, microvm) };
}

/** Newest first, as Cocoon lists them; the nextToken is Cocoon's own keyset cursor. */
export async function listMicrovmsOperation(services: AwsServices, request: AwsRequest) {
  const maxResults = queryInt(request.query, 'maxResults', { min: 1, max: MAX_RESULTS }) ?? MAX_RESULTS;
  const nextToken = queryString(request.query, 'nextToken');
  const imageIdentifier = queryString(request.query, 'imageIdentifier');
  const imageVersion = queryString(request.query, 'imageVersion');
  if (imageVersion !== undefined && imageIdentifier === undefined) throw validation('imageVersion filters only together with imageIdentifier');
  let imageFilter: { imageArn?: string; imageArns?: string[] } = {};
  if (imageIdentifier !== undefined) {
    str({ imageIdentifier }, 'imageIdentifier', IDENTIFIER);
    const image = await resolveImage(services, request.tenant, imageIdentifier);
    const version = imageVersion ?? (image.pinned ? String(image.pinned.version) : undefined);
    const arns = image.versions.filter((v) => version === undefined || String(v.version) === version).map((v) => v.arn);
    imageFilter = { imageArns: arns };
  }
  if (imageFilter.imageArns?.length === 0) return { body: { items: [] } };
  let cursor: string | undefined = nextToken === '' ? undefined : nextToken;
  const items: ReturnType<typeof itemView>[] = [];
  let next: string | null = null;
  // One store query per image version filtered on (usually one); otherwise one query.
  const arns = imageFilter.imageArns ?? [undefined];
  if (arns.length > 1) {
    // Several versions: page over the tenant's list and keep this image's microVMs.
    const wanted = new Set(arns);
    for (;;) {
      const page = await listMicrovms(services.db, { tenantId: request.tenant.id, limit: maxResults, cursor: cursor ?? null });
      for (const m of page.items) if (wanted.has(m.imageArn) && items.length < maxResults) items.push(itemView(services, request.tenant, m));
      cursor = page.nextCursor ?? undefined;
      if (items.length >= maxResults) {
        // Full: the next page starts after the last one given (it may turn out empty).
        next = encodeCursor(items.at(-1)!.microvmId);
        break;
      }
      if (!page.nextCursor) break;
    }
  } else {
    const page = await listMicrovms(services.db, {
      tenantId: request.tenant.id, limit: maxResults, cursor: cursor ?? null, ...(arns[0] ? { imageArn: arns[0] } : {}),
    });
    items.push(...page.items.map((m) => itemView(services, request.tenant, m)));
    next = page.nextCursor;
  }
  return { body: { items, ...(next ? { nextToken: next } : {}) } };
}

function itemView(services: AwsServices, tenant: Tenant, microvm: Microvm) {
  const view = microvmView(services, tenant, microvm);
  return { microvmId: view.microvmId, state: view.state, imageArn: view.imageArn, imageVersion: view.imageVersion, startedAt: view.startedAt };
}

/** How long suspend and resume answers wait for the operation before answering anyway. */
const OPERATION_WAIT_MS = 30_000;
const ROLE_ARN = /^arn:aws[a-z-]*:iam::[0-9]{12}:role\/?[a-zA-Z_0-9+=,.@\-/]+$/;

async function withDeadline(work: Promise<void>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([work, new Promise<void>((resolve) => { timer = setTimeout(resolve, ms); })]);
  } finally {
    clearTimeout(timer);
  }
}

/** The model's IdlePolicy (all three members required) as Cocoon's. */
function idlePolicyOf(body: Json): IdlePolicy | undefined {
  const policy = struct(body, 'idlePolicy');
  if (policy === undefined) return undefined;
  onlyMembers(policy, ['maxIdleDurationSeconds', 'suspendedDurationSeconds', 'autoResumeEnabled'], 'idlePolicy');
  const maxIdle = int(policy, 'maxIdleDurationSeconds', { required: true, min: 60 }, 'idlePolicy.maxIdleDurationSeconds');
  const suspended = int(policy, 'suspendedDurationSeconds', { required: true, min: 0 }, 'idlePolicy.suspendedDurationSeconds');
  const autoResume = bool(policy, 'autoResumeEnabled', { required: true }, 'idlePolicy.autoResumeEnabled') as boolean;
  return {
    autoResumeEnabled: autoResume,
    // Beyond the longest session (8 hours) a limit is never reached: the session ends first.
    maxIdleDurationSeconds: Math.min(maxIdle, MAX_SESSION_SECONDS),
    // 0: terminate as soon as suspended (Cocoon's shortest is 1 s); ≥ 8 hours: until the session ends.
    suspendedDurationSeconds: suspended >= MAX_SESSION_SECONDS ? null : Math.max(1, suspended),
  };
}

function refuseLogging(body: Json): void {
  const logging = struct(body, 'logging');
  if (logging === undefined) return;
  onlyMembers(logging, ['disabled', 'cloudWatch'], 'logging');
  if (logging.cloudWatch !== undefined) {
    throw validation('CloudWatch logging is not available in Cocoon: omit logging or send {"disabled": {}}; the microVM\'s log is at GET /api/v1/microvms/{id}/logs');
  }
  if (!isObject(logging.disabled)) throw validation('logging takes exactly one of disabled, cloudWatch');
}

export async function runMicrovm(services: AwsServices, request: AwsRequest) {
  const body = request.body;
  onlyMembers(body, [
    'ingressNetworkConnectors', 'egressNetworkConnectors', 'imageIdentifier', 'imageVersion', 'executionRoleArn', 'idlePolicy', 'logging',
    'runHookPayload', 'maximumDurationInSeconds', 'clientToken',
  ]);
  const identifier = str(body, 'imageIdentifier', IDENTIFIER);
  const imageVersion = str(body, 'imageVersion', { min: 1, max: 2048, pattern: /^[^\s]+$/ });
  const executionRoleArn = str(body, 'executionRoleArn', { min: 20, max: 2048, pattern: ROLE_ARN });
  const idlePolicy = idlePolicyOf(body);
  refuseLogging(body);
  const runHookPayload = str(body, 'runHookPayload', { max: 4096 });
  const maximumDurationSeconds = int(body, 'maximumDurationInSeconds', { min: 1, max: MAX_SESSION_SECONDS });
  const clientToken = str(body, 'clientToken', { min: 1, max: 128 });
  const ingress = stringList(body, 'ingressNetworkConnectors', { max: 10, item: { min: 1, max: 2048 } }) ?? [];
  const egress = stringList(body, 'egressNetworkConnectors', { max: 10, item: { min: 1, max: 2048 } }) ?? [];
  // The shell connector needs nothing in Cocoon (CreateMicrovmShellAuthToken works for every microVM).
  if (ingress.some((c) => !c.endsWith('SHELL_INGRESS')) || egress.length) {
    throw validation('VPC network connectors are not available in Cocoon (only SHELL_INGRESS, which every microVM has): guests reach nothing outside unless their image enables network egress');
  }

  const image = await resolveImage(services, request.tenant, identifier);
  let version = image.pinned;
  if (imageVersion !== undefined) {
    version = image.versions.find((v) => String(v.version) === imageVersion);
    if (!version) throw notFound('MicrovmImageVersion', `${image.name}:${imageVersion}`, `image ${image.name} has no version ${imageVersion}`);
  }
  version ??= latestActive(image.versions, image.records);
  if (!version) throw conflict(`image ${image.name} has no ACTIVE version that finished building (CREATED); wait for its build or UpdateMicrovmImageVersion`, 'MicrovmImage', image.name);
  if (statusOf(image.records, version) === 'INACTIVE') throw conflict(`version ${version.version} of image ${image.name} is INACTIVE; microVMs start only from ACTIVE versions`, 'MicrovmImageVersion', `${image.name}:${version.version}`);

  const { microvm } = await services.microvms().start({
    tenantId: request.tenant.id,
    image: version,
    idlePolicy,
    maximumDurationSeconds,
    // Namespaced and of Cocoon's form (the model allows 128 characters of anything).
    clientToken: clientToken === undefined ? undefined : `aws-${createHash('sha256').update(clientToken).digest('base64url')}`,
    runHookPayload,
    requestParts: ['RunMicrovm', executionRoleArn ?? null, ingress],
  });
  return { body: { ...microvmView(services, request.tenant, microvm), ...(executionRoleArn ? { executionRoleArn } : {}) } };
}

export async function suspendMicrovm(services: AwsServices, request: AwsRequest) {
  const microvm = await findMicrovm(services, request.tenant, str(request.params, 'microvmIdentifier', IDENTIFIER));
  await withDeadline(services.microvms().suspend(microvm.id), OPERATION_WAIT_MS);
  return { body: {} };
}

export async function resumeMicrovm(services: AwsServices, request: AwsRequest) {
  const microvm = await findMicrovm(services, request.tenant, str(request.params, 'microvmIdentifier', IDENTIFIER));
  await withDeadline(services.microvms().resume(microvm.id), OPERATION_WAIT_MS);
  return { body: {} };
}

/** Idempotent: a terminated microVM answers success again. */
export async function terminateMicrovm(services: AwsServices, request: AwsRequest) {
  const microvm = await findMicrovm(services, request.tenant, str(request.params, 'microvmIdentifier', IDENTIFIER));
  await services.microvms().terminate(microvm.id, 'terminated through the AWS API');
  return { body: {} };
}
