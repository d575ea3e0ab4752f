/**
 * Who signed an AWS request: the access key id is a Cocoon API key's id (as GET /api/v1/api-keys
 * lists it), the secret access key is the API key itself. The secret is read back from its
 * sealed copy (store migration 5); keys made before that have none and cannot sign.
 */
import { findApiKeyForSigning } from '../../store/api-keys.ts';
import type { SecretSealer } from '../../store/sealed-secrets.ts';
import type { Db } from '../../store/sql.ts';
import type { Tenant } from '../../store/tenants.ts';
import { AwsError } from './errors.ts';
import type { SecretLookup } from './sigv4.ts';

export function apiKeySecrets(db: Db, sealer: () => SecretSealer): SecretLookup<Tenant> {
  return async (accessKeyId) => {
    const found = await findApiKeyForSigning(db, accessKeyId);
    if (!found) throw new AwsError('UnrecognizedClientException', 'The security token included in the request is invalid: the access key id is not an active Cocoon API key id.');
    const secret = found.sealedSecret === null ? undefined : sealer().unseal(found.sealedSecret, found.apiKey.id);
    if (secret === undefined) {
      throw new AwsError(
        'UnrecognizedClientException',
        `API key ${found.apiKey.id} cannot sign AWS requests: it was made before Cocoon kept sealed key copies (or on another data directory). ` +
          'Create a new API key (POST /api/v1/api-keys or `cocoon apikey create`) and use its id and secret.',
      );
    }
    return { secret, principal: found.tenant };
  };
}
