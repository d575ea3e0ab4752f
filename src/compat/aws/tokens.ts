/**
 * Auth tokens: CreateMicrovmAuthToken (ports: one, a range, or all) and
 * CreateMicrovmShellAuthToken, both Cocoon gateway tokens (≤ 60 minutes), answered as the
 * model's TokenParts `{"X-aws-proxy-auth": <token>}`: the header the gateway takes.
 */
import { MAX_TOKEN_MINUTES, createToken, type PortSpec } from '../../store/tokens.ts';
import type { AwsRequest, AwsServices } from './context.ts';
import { validation } from './errors.ts';
import { findMicrovm } from './microvms.ts';
import { int, isObject, list, onlyMembers, str, struct, type Json } from './validate.ts';

export const TOKEN_HEADER = 'X-aws-proxy-auth';
const IDENTIFIER = { required: true, min: 1, max: 256 } as const;

/** The model's PortSpecification list (each exactly one of port, range, allPorts) → Cocoon's; null: every port. */
export function portsFromAws(body: Json): PortSpec[] | null {
  const specs = list(body, 'allowedPorts', { required: true, min: 1, max: 64 }) as unknown[];
  const out: PortSpec[] = [];
  let all = false;
  specs.forEach((spec, i) => {
    const path = `allowedPorts.${i + 1}`;
    if (!isObject(spec)) throw validation(`${path} must be a structure`);
    onlyMembers(spec, ['port', 'range', 'allPorts'], path);
    if (Object.keys(spec).length !== 1) throw validation(`${path} takes exactly one of port, range, allPorts`);
    if (spec.port !== undefined) out.push(int(spec, 'port', { required: true, min: 1, max: 65535 }, `${path}.port`));
    else if (spec.range !== undefined) {
      const range = struct(spec, 'range', { required: true }, `${path}.range`) as Json;
      onlyMembers(range, ['startPort', 'endPort'], `${path}.range`);
      const from = int(range, 'startPort', { required: true, min: 1, max: 65535 }, `${path}.range.startPort`);
      const to = int(range, 'endPort', { required: true, min: 1, max: 65535 }, `${path}.range.endPort`);
      if (from > to) throw validation(`${path}.range: startPort must not be above endPort`);
      out.push({ from, to });
    } else {
      const unit = struct(spec, 'allPorts', { required: true }, `${path}.allPorts`) as Json;
      onlyMembers(unit, [], `${path}.allPorts`);
      all = true;
    }
  });
  return all ? null : out;
}

function expiration(body: Json): number {
  return int(body, 'expirationInMinutes', { required: true, min: 1, max: MAX_TOKEN_MINUTES });
}

export async function createMicrovmAuthToken(services: AwsServices, request: AwsRequest) {
  onlyMembers(request.body, ['expirationInMinutes', 'allowedPorts']);
  const expirationMinutes = expiration(request.body);
  const allowedPorts = portsFromAws(request.body);
  const microvm = await findMicrovm(services, request.tenant, str(request.params, 'microvmIdentifier', IDENTIFIER));
  const { secret } = await createToken(services.db, { microvmId: microvm.id, tenantId: request.tenant.id, expirationMinutes, allowedPorts });
  return { body: { authToken: { [TOKEN_HEADER]: secret } } };
}

export async function createMicrovmShellAuthToken(services: AwsServices, request: AwsRequest) {
  onlyMembers(request.body, ['expirationInMinutes']);
  const expirationMinutes = expiration(request.body);
  const microvm = await findMicrovm(services, request.tenant, str(request.params, 'microvmIdentifier', IDENTIFIER));
  const { secret } = await createToken(services.db, { microvmId: microvm.id, tenantId: request.tenant.id, expirationMinutes, scope: 'shell' });
  return { body: { authToken: { [TOKEN_HEADER]: secret } } };
}
