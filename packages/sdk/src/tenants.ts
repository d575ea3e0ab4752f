import { segment, type CallOptions, type Transport } from './http.ts';
import { paginate } from './pagination.ts';
import type { ApiKey, CreatedApiKey, CreatedTenant, Page, PageParams, Tenant } from './types.ts';

/** Tenants own images and microVMs. Admin key only. */
export class Tenants {
  readonly #http: Transport;

  constructor(http: Transport) {
    this.#http = http;
  }

  /** A new tenant and its first API key (shown once). */
  create(input: { name: string }, options: CallOptions = {}): Promise<CreatedTenant> {
    return this.#http.json<CreatedTenant>({ method: 'POST', path: '/tenants', json: input, ...options });
  }

  list(params: PageParams = {}, options: CallOptions = {}): Promise<Page<Tenant>> {
    return this.#http.json<Page<Tenant>>({ method: 'GET', path: '/tenants', query: { limit: params.limit, cursor: params.cursor }, ...options });
  }

  iterate(params: PageParams = {}, options: CallOptions = {}): AsyncGenerator<Tenant, void, undefined> {
    return paginate((p) => this.list(p, options), params);
  }

  /** Another API key for a tenant (shown once). */
  createApiKey(tenantId: string, input: { name?: string } = {}, options: CallOptions = {}): Promise<CreatedApiKey> {
    return this.#http.json<CreatedApiKey>({ method: 'POST', path: `/tenants/${segment(tenantId)}/api-keys`, json: input, ...options });
  }
}

/** The calling tenant's own API keys. */
export class ApiKeys {
  readonly #http: Transport;

  constructor(http: Transport) {
    this.#http = http;
  }

  /** A new key for the caller's tenant (the secret is shown once). */
  create(input: { name?: string } = {}, options: CallOptions = {}): Promise<CreatedApiKey> {
    return this.#http.json<CreatedApiKey>({ method: 'POST', path: '/api-keys', json: input, ...options });
  }

  list(params: PageParams = {}, options: CallOptions = {}): Promise<Page<ApiKey>> {
    return this.#http.json<Page<ApiKey>>({ method: 'GET', path: '/api-keys', query: { limit: params.limit, cursor: params.cursor }, ...options });
  }

  iterate(params: PageParams = {}, options: CallOptions = {}): AsyncGenerator<ApiKey, void, undefined> {
    return paginate((p) => this.list(p, options), params);
  }

  /** Revokes a key at once. */
  async revoke(id: string, options: CallOptions = {}): Promise<void> {
    await this.#http.send({ method: 'DELETE', path: `/api-keys/${segment(id)}`, ...options });
  }
}
