/**
 * Tags (`/2017-03-31/tags/{Resource}`, Lambda's tagging API): on images, the only taggable
 * resource of the model's that Cocoon has (TaggableResource names microvm-image ARNs; microVMs
 * are not taggable in the model). Kept per image name, at most 50.
 */
import type { AwsRequest, AwsServices } from './context.ts';
import { validation } from './errors.ts';
import { resolveImage } from './images.ts';
import { MAX_TAGS, getTags, setTags } from './store.ts';
import { onlyMembers, str, stringMap, type Json } from './validate.ts';

const TAG = /^[\p{L}\p{Z}\p{N}_.:/=+\-@]*$/u;

export function parseTags(body: Json, key: string): Record<string, string> | undefined {
  return stringMap(body, key, { maxEntries: MAX_TAGS, key: { min: 1, max: 128, pattern: TAG }, value: { max: 256, pattern: TAG } });
}

async function taggedImage(services: AwsServices, request: AwsRequest) {
  const resource = str(request.params, 'Resource', { required: true, min: 1, max: 10000 });
  if (!/:microvm-image[:/]/.test(resource)) throw validation(`only MicroVM images take tags: '${resource.slice(0, 200)}' is not a microvm-image ARN`);
  return resolveImage(services, request.tenant, resource);
}

export async function listTags(services: AwsServices, request: AwsRequest) {
  const image = await taggedImage(services, request);
  return { body: { Tags: await getTags(services.db, request.tenant.id, image.name) } };
}

export async function tagResource(services: AwsServices, request: AwsRequest) {
  onlyMembers(request.body, ['Tags']);
  const tags = parseTags(request.body, 'Tags');
  if (tags === undefined) throw validation("1 validation error detected: Value at 'Tags' failed to satisfy constraint: Member must not be null");
  const image = await taggedImage(services, request);
  const merged = { ...(await getTags(services.db, request.tenant.id, image.name)), ...tags };
  if (Object.keys(merged).length > MAX_TAGS) throw validation(`a resource has at most ${MAX_TAGS} tags`);
  await setTags(services.db, request.tenant.id, image.name, merged);
  return { status: 204 };
}

export async function untagResource(services: AwsServices, request: AwsRequest) {
  const raw = request.query.tagKeys;
  if (raw === undefined) throw validation("1 validation error detected: Value at 'tagKeys' failed to satisfy constraint: Member must not be null");
  const keys = [raw].flat();
  for (const k of keys) str({ k }, 'k', { required: true, min: 1, max: 128, pattern: TAG }, 'tagKeys.member');
  const image = await taggedImage(services, request);
  const tags = await getTags(services.db, request.tenant.id, image.name);
  for (const k of keys) delete tags[k];
  await setTags(services.db, request.tenant.id, image.name, tags);
  return { status: 204 };
}
