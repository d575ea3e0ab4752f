/**
 * The microVM operations on Cocoon's lifecycle engine and microVM store: run, get, list,
 * suspend, resume, terminate. A microVM's id is Cocoon's (`mvm-…`); its endpoint is its host on
 * the gateway (`<id>.<gateway domain>:<gateway port>`), where requests carry `X-aws-proxy-auth`.
 */
import { encodeCursor } from '../../store/pagination.ts';
import { findTenantMicrovm, listMicrovms, type Microvm } from '../../store/microvms.ts';
import type { Tenant } from '../../store/tenants.ts';
import type { AwsRequest, AwsServices } from './context.ts';
import { notFound, validation } from './errors.ts';
import { resolveImage } from './images.ts';
import { MAX_RESULTS } from './pagination.ts';
import { awsImageArn, epoch, imageNameAndVersion, microvmState, microvmStateReason } from './shapes.ts';
import { queryInt, queryString, str } from './validate.ts';

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
        next = cursor === undefined ? null : encodeCursor(items.at(-1)!.microvmId);
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
