import type { FastifyInstance } from 'fastify';
import type { Readable } from 'node:stream';
import { Type } from 'typebox';
import type { BundleLimits } from '../../builder/bundle.ts';
import { DEFAULT_BUNDLE_LIMITS } from '../../builder/bundle.ts';
import { bundleTooLarge, storeUploadedBundle } from '../../images/bundle-upload.ts';
import type { ApiContext, ApiRoutes } from '../app.ts';
import { ErrorSchema } from '../schemas.ts';
import { CocoonError } from '../../common/errors.ts';

/** What an upload may be sent as; the format itself is told by the first bytes, never the header. */
export const BUNDLE_MEDIA_TYPES = ['application/gzip', 'application/x-gzip', 'application/zip', 'application/x-zip-compressed', 'application/octet-stream'];

const BundleSchema = Type.Object(
  {
    uri: Type.String({ description: 'Pass as `bundle` to POST /images: cocoon://bundles/<sha256>.<tar.gz|zip>' }),
    sha256: Type.String({ pattern: '^[0-9a-f]{64}$' }),
    sizeBytes: Type.Integer({ minimum: 0 }),
    format: Type.Union([Type.Literal('tar.gz'), Type.Literal('zip')]),
    createdAt: Type.String({ format: 'date-time' }),
  },
  { $id: 'Bundle', description: 'An uploaded, validated bundle' },
);

const binary = { schema: { type: 'string', format: 'binary' } };

/** `POST /bundles`: a streamed, validated upload (see images/bundle-upload.ts). */
export function bundleRoutes(options: { limits: () => Partial<BundleLimits> }): ApiRoutes {
  return async (parent: FastifyInstance, context: ApiContext) => {
    // In a scope of its own, so that the raw-body parser applies to this route only.
    await parent.register(async (app) => {
    // The raw body as a stream: never read whole into memory, never parsed by Fastify.
    app.addContentTypeParser(BUNDLE_MEDIA_TYPES, (_request, payload, done) => done(null, payload));
    app.post(
      '/bundles',
      {
        schema: {
          summary: 'Upload a bundle (.tar.gz or .zip with a Dockerfile at its root); validated before it is stored',
          body: { content: Object.fromEntries(BUNDLE_MEDIA_TYPES.map((t) => [t, binary])) },
          response: { 201: BundleSchema, 400: ErrorSchema, 401: ErrorSchema, 415: ErrorSchema },
        },
        // The body is a stream: there is nothing for a JSON schema validator to check.
        validatorCompiler: () => () => true,
      },
      async (request, reply) => {
        const type = (request.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
        if (!BUNDLE_MEDIA_TYPES.includes(type)) {
          throw new CocoonError('unsupported_media_type', `send the bundle as application/gzip (.tar.gz) or application/zip (.zip), not ${type || 'no content type'}`, { status: 415 });
        }
        const limits = { ...DEFAULT_BUNDLE_LIMITS, ...options.limits() };
        const declared = Number(request.headers['content-length']);
        if (Number.isFinite(declared) && declared > limits.maxCompressedBytes) {
          (request.body as Readable).resume();
          reply.header('connection', 'close');
          throw bundleTooLarge(limits.maxCompressedBytes);
        }
        const { bundle } = await storeUploadedBundle(
          { db: context.db, objects: context.objects, dataDir: context.config.dataDir, limits },
          request.tenant.id,
          request.body as Readable,
        );
        return reply.status(201).send({
          uri: bundle.uri,
          sha256: bundle.sha256,
          sizeBytes: bundle.sizeBytes,
          format: bundle.format,
          createdAt: bundle.createdAt,
        });
      },
    );
    });
  };
}
