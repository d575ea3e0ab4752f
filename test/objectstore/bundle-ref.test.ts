import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { isCocoonError } from '../../src/common/errors.ts';
import { bundleObjectKey, bundleUri, parseBundleRef } from '../../src/objectstore/bundle-ref.ts';

const SHA = 'a'.repeat(64);

test('parses the URIs POST /bundles returns', () => {
  assert.deepEqual(parseBundleRef(`cocoon://bundles/${SHA}.tar.gz`), {
    scheme: 'cocoon', uri: `cocoon://bundles/${SHA}.tar.gz`, sha256: SHA, format: 'tar.gz', key: `bundles/${SHA}.tar.gz`,
  });
  assert.deepEqual(parseBundleRef(`cocoon://bundles/${SHA}.zip`), {
    scheme: 'cocoon', uri: `cocoon://bundles/${SHA}.zip`, sha256: SHA, format: 'zip', key: `bundles/${SHA}.zip`,
  });
  assert.equal(bundleUri(SHA, 'zip'), `cocoon://bundles/${SHA}.zip`);
  assert.equal(bundleObjectKey(SHA, 'tar.gz'), `bundles/${SHA}.tar.gz`);
});

test('parses s3://bucket/key', () => {
  assert.deepEqual(parseBundleRef('s3://my-bucket/apps/v1/app.tar.gz'), {
    scheme: 's3', uri: 's3://my-bucket/apps/v1/app.tar.gz', bucket: 'my-bucket', key: 'apps/v1/app.tar.gz',
  });
});

test('refuses malformed references with invalid_bundle_uri and a reason', () => {
  const cases: Array<[unknown, RegExp]> = [
    [undefined, /URI string/],
    [42, /URI string/],
    ['', /URI string/],
    ['https://example.com/app.tar.gz', /unsupported bundle URI/],
    ['/etc/passwd', /unsupported bundle URI/],
    ['file:///etc/passwd', /unsupported bundle URI/],
    [`cocoon://bundles/${SHA}.tar`, /not a bundle URI returned by POST \/bundles/],
    [`cocoon://bundles/${SHA.toUpperCase()}.zip`, /not a bundle URI/],
    [`cocoon://bundles/../${SHA}.zip`, /not a bundle URI/],
    ['cocoon://bundles/abc.zip', /not a bundle URI/],
    ['s3://bucket', /s3:\/\/bucket\/key/],
    ['s3://bucket/', /s3:\/\/bucket\/key/],
    ['s3:///key', /s3:\/\/bucket\/key/],
    ['s3://Bad_Bucket/key', /bad bucket/],
    ['s3://bucket/../../etc/passwd', /bad key/],
    ['s3://bucket/a//b', /bad key/],
    ['s3://bucket/key?versionId=1', /bad key/],
    [`s3://bucket/${'k'.repeat(2000)}`, /longer than/],
  ];
  for (const [input, reason] of cases) {
    assert.throws(
      () => parseBundleRef(input),
      (e) => isCocoonError(e, 'invalid_bundle_uri') && e.status === 400 && reason.test(e.message),
      `${String(input).slice(0, 60)} should be refused with ${reason}`,
    );
  }
});

test('property: a formatted URI parses back to the same bundle', () => {
  fc.assert(
    fc.property(fc.stringMatching(/^[0-9a-f]{64}$/), fc.constantFrom('tar.gz' as const, 'zip' as const), (sha, format) => {
      const ref = parseBundleRef(bundleUri(sha, format));
      assert.equal(ref.scheme, 'cocoon');
      assert.ok(ref.scheme === 'cocoon' && ref.sha256 === sha && ref.format === format);
    }),
    { numRuns: 200 },
  );
});

test('property: anything parsed as s3 has a safe key and bucket', () => {
  fc.assert(
    fc.property(fc.string({ maxLength: 80 }), (tail) => {
      let ref;
      try {
        ref = parseBundleRef(`s3://${tail}`);
      } catch (error) {
        assert.ok(isCocoonError(error, 'invalid_bundle_uri'));
        return;
      }
      assert.ok(ref.scheme === 's3');
      assert.ok(!ref.key.split('/').includes('..') && !ref.key.startsWith('/'));
    }),
    { numRuns: 500 },
  );
});
