/**
 * Input checks at the boundary, with the model's constraints (lambda-microvms 2025-09-09
 * service-2.json: required members, min/max lengths and values, enums, patterns). A failure is
 * a ValidationException naming the member, as AWS words it. Unknown members are refused too, so
 * that nothing a client sends is silently dropped.
 */
import { validation } from './errors.ts';

export type Json = Record<string, unknown>;

/** The request body as a JSON object ({} when empty). */
export function jsonBody(raw: Buffer | undefined): Json {
  if (raw === undefined || raw.length === 0) return {};
  let value: unknown;
  try {
    value = JSON.parse(raw.toString('utf8'));
  } catch {
    throw validation('the request body is not valid JSON');
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw validation('the request body must be a JSON object');
  return value as Json;
}

export function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function fail(path: string, constraint: string): never {
  throw validation(`1 validation error detected: Value at '${path}' failed to satisfy constraint: ${constraint}`);
}

export function onlyMembers(value: Json, allowed: readonly string[], path = ''): void {
  for (const key of Object.keys(value)) {
    if (!allowed.includes(key)) throw validation(`unknown member '${path ? `${path}.` : ''}${key}' (this operation takes ${allowed.join(', ') || 'no members'})`);
  }
}

interface StringRule {
  required?: boolean;
  min?: number;
  max?: number;
  pattern?: RegExp;
}

export function str(value: Json, key: string, rule: StringRule & { required: true }, path?: string): string;
export function str(value: Json, key: string, rule?: StringRule, path?: string): string | undefined;
export function str(value: Json, key: string, rule: StringRule = {}, path = key): string | undefined {
  const v = value[key];
  if (v === undefined || v === null) {
    if (rule.required) fail(path, 'Member must not be null');
    return undefined;
  }
  if (typeof v !== 'string') fail(path, 'Member must be a string');
  const length = [...v].length;
  if (rule.min !== undefined && length < rule.min) fail(path, `Member must have length greater than or equal to ${rule.min}`);
  if (rule.max !== undefined && length > rule.max) fail(path, `Member must have length less than or equal to ${rule.max}`);
  if (rule.pattern && !rule.pattern.test(v)) fail(path, `Member must satisfy regular expression pattern: ${rule.pattern.source}`);
  return v;
}

interface IntRule {
  required?: boolean;
  min?: number;
  max?: number;
}

export function int(value: Json, key: string, rule: IntRule & { required: true }, path?: string): number;
export function int(value: Json, key: string, rule?: IntRule, path?: string): number | undefined;
export function int(value: Json, key: string, rule: IntRule = {}, path = key): number | undefined {
  const v = value[key];
  if (v === undefined || v === null) {
    if (rule.required) fail(path, 'Member must not be null');
    return undefined;
  }
  if (typeof v !== 'number' || !Number.isInteger(v)) fail(path, 'Member must be an integer');
  if (rule.min !== undefined && v < rule.min) fail(path, `Member must have value greater than or equal to ${rule.min}`);
  if (rule.max !== undefined && v > rule.max) fail(path, `Member must have value less than or equal to ${rule.max}`);
  return v;
}

export function bool(value: Json, key: string, rule: { required?: boolean } = {}, path = key): boolean | undefined {
  const v = value[key];
  if (v === undefined || v === null) {
    if (rule.required) fail(path, 'Member must not be null');
    return undefined;
  }
  if (typeof v !== 'boolean') fail(path, 'Member must be a boolean');
  return v;
}

export function oneOf<T extends string>(value: Json, key: string, values: readonly T[], rule: { required?: boolean } = {}, path = key): T | undefined {
  const v = str(value, key, rule, path);
  if (v === undefined) return undefined;
  if (!(values as readonly string[]).includes(v)) fail(path, `Member must satisfy enum value set: [${values.join(', ')}]`);
  return v as T;
}

export function struct(value: Json, key: string, rule: { required?: boolean } = {}, path = key): Json | undefined {
  const v = value[key];
  if (v === undefined || v === null) {
    if (rule.required) fail(path, 'Member must not be null');
    return undefined;
  }
  if (!isObject(v)) fail(path, 'Member must be a structure');
  return v;
}

export function list(value: Json, key: string, rule: { required?: boolean; min?: number; max?: number } = {}, path = key): unknown[] | undefined {
  const v = value[key];
  if (v === undefined || v === null) {
    if (rule.required) fail(path, 'Member must not be null');
    return undefined;
  }
  if (!Array.isArray(v)) fail(path, 'Member must be a list');
  if (rule.min !== undefined && v.length < rule.min) fail(path, `Member must have length greater than or equal to ${rule.min}`);
  if (rule.max !== undefined && v.length > rule.max) fail(path, `Member must have length less than or equal to ${rule.max}`);
  return v;
}

/** A list of strings, each checked like `str`. */
export function stringList(value: Json, key: string, rule: { min?: number; max?: number; item: StringRule }, path = key): string[] | undefined {
  const items = list(value, key, rule, path);
  return items?.map((item, i) => str({ item }, 'item', { ...rule.item, required: true }, `${path}.${i + 1}.member`));
}

/** A map of string to string (environment variables, tags). */
export function stringMap(
  value: Json,
  key: string,
  rule: { maxEntries?: number; key: StringRule; value: StringRule },
  path = key,
): Record<string, string> | undefined {
  const map = struct(value, key, {}, path);
  if (map === undefined) return undefined;
  const entries = Object.entries(map);
  if (rule.maxEntries !== undefined && entries.length > rule.maxEntries) fail(path, `Member must have at most ${rule.maxEntries} entries`);
  const out: Record<string, string> = {};
  for (const [k, v] of entries) {
    str({ k }, 'k', { ...rule.key, required: true }, `${path}.key`);
    out[k] = str({ v }, 'v', { ...rule.value, required: true }, `${path}.${k}`) as string;
  }
  return out;
}

/** A query parameter (the first value when repeated). */
export function queryString(query: Record<string, string | string[]>, key: string): string | undefined {
  const v = query[key];
  return Array.isArray(v) ? v[0] : v;
}

export function queryInt(query: Record<string, string | string[]>, key: string, rule: { min: number; max: number }): number | undefined {
  const raw = queryString(query, key);
  if (raw === undefined) return undefined;
  if (!/^-?\d{1,10}$/.test(raw)) fail(key, 'Member must be an integer');
  return int({ [key]: Number(raw) }, key, rule);
}
