import { segment, type CallOptions, type Transport } from './http.ts';
import type { CreateTokenInput, IssuedToken, TokenInfo } from './types.ts';

/** Gateway tokens: short-lived (≤ 60 min) secrets for web requests to one microVM. */
export class Tokens {
  readonly #http: Transport;

  constructor(http: Transport) {
    this.#http = http;
  }

  /** A new token for the microVM (send it as `X-Cocoon-Token`; shown once). */
  create(microvmId: string, input: CreateTokenInput = {}, options: CallOptions = {}): Promise<IssuedToken> {
    return this.#http.json<IssuedToken>({ method: 'POST', path: `/microvms/${segment(microvmId)}/tokens`, json: input, ...options });
  }

  /** The microVM's tokens (never their secrets). */
  async list(microvmId: string, options: CallOptions = {}): Promise<TokenInfo[]> {
    const page = await this.#http.json<{ items: TokenInfo[] }>({ method: 'GET', path: `/microvms/${segment(microvmId)}/tokens`, ...options });
    return page.items;
  }

  /** Revokes a token at once. */
  async revoke(microvmId: string, tokenId: string, options: CallOptions = {}): Promise<void> {
    await this.#http.send({ method: 'DELETE', path: `/microvms/${segment(microvmId)}/tokens/${segment(tokenId)}`, ...options });
  }
}
