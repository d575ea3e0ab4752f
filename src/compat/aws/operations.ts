/**
 * The model's 24 operations and what serves each (docs/aws.md has the table with the reasons).
 * Paths are the model's requestUri with Fastify labels.
 */
import type { AwsOperation, OperationRoute } from './context.ts';
import { AwsError } from './errors.ts';
import {
  getMicrovmImage, getMicrovmImageBuild, getMicrovmImageVersion, listManagedMicrovmImageVersions, listManagedMicrovmImages,
  listMicrovmImageBuilds, listMicrovmImageVersions, listMicrovmImages,
} from './images.ts';
import { getMicrovm, listMicrovmsOperation } from './microvms.ts';

const notYet = (name: string): AwsOperation => async () => {
  throw new AwsError('ValidationException', `${name} is not served by Cocoon's AWS surface yet`);
};

const V = '/2025-09-09';
const IMAGE = `${V}/microvm-images/:imageIdentifier`;
const VERSION = `${IMAGE}/versions/:imageVersion`;
const MICROVM = `${V}/microvms/:microvmIdentifier`;

export const OPERATIONS: readonly OperationRoute[] = [
  { name: 'ListManagedMicrovmImages', method: 'GET', path: `${V}/managed-microvm-images`, handler: listManagedMicrovmImages },
  { name: 'ListManagedMicrovmImageVersions', method: 'GET', path: `${V}/managed-microvm-images/:imageIdentifier/versions`, handler: listManagedMicrovmImageVersions },
  { name: 'CreateMicrovmImage', method: 'POST', path: `${V}/microvm-images`, handler: notYet('CreateMicrovmImage') },
  { name: 'ListMicrovmImages', method: 'GET', path: `${V}/microvm-images`, handler: listMicrovmImages },
  { name: 'GetMicrovmImage', method: 'GET', path: IMAGE, handler: getMicrovmImage },
  { name: 'UpdateMicrovmImage', method: 'PUT', path: IMAGE, handler: notYet('UpdateMicrovmImage') },
  { name: 'DeleteMicrovmImage', method: 'DELETE', path: IMAGE, handler: notYet('DeleteMicrovmImage') },
  { name: 'ListMicrovmImageVersions', method: 'GET', path: `${IMAGE}/versions`, handler: listMicrovmImageVersions },
  { name: 'GetMicrovmImageVersion', method: 'GET', path: VERSION, handler: getMicrovmImageVersion },
  { name: 'UpdateMicrovmImageVersion', method: 'PATCH', path: VERSION, handler: notYet('UpdateMicrovmImageVersion') },
  { name: 'DeleteMicrovmImageVersion', method: 'DELETE', path: VERSION, handler: notYet('DeleteMicrovmImageVersion') },
  { name: 'ListMicrovmImageBuilds', method: 'GET', path: `${VERSION}/builds`, handler: listMicrovmImageBuilds },
  { name: 'GetMicrovmImageBuild', method: 'GET', path: `${VERSION}/builds/:buildId`, handler: getMicrovmImageBuild },
  { name: 'RunMicrovm', method: 'POST', path: `${V}/microvms`, handler: notYet('RunMicrovm') },
  { name: 'ListMicrovms', method: 'GET', path: `${V}/microvms`, handler: listMicrovmsOperation },
  { name: 'GetMicrovm', method: 'GET', path: MICROVM, handler: getMicrovm },
  { name: 'TerminateMicrovm', method: 'DELETE', path: MICROVM, handler: notYet('TerminateMicrovm') },
  { name: 'SuspendMicrovm', method: 'POST', path: `${MICROVM}/suspend`, handler: notYet('SuspendMicrovm') },
  { name: 'ResumeMicrovm', method: 'POST', path: `${MICROVM}/resume`, handler: notYet('ResumeMicrovm') },
  { name: 'CreateMicrovmAuthToken', method: 'POST', path: `${MICROVM}/auth-token`, handler: notYet('CreateMicrovmAuthToken') },
  { name: 'CreateMicrovmShellAuthToken', method: 'POST', path: `${MICROVM}/shell-auth-token`, handler: notYet('CreateMicrovmShellAuthToken') },
  { name: 'ListTags', method: 'GET', path: '/2017-03-31/tags/:Resource', handler: notYet('ListTags') },
  { name: 'TagResource', method: 'POST', path: '/2017-03-31/tags/:Resource', handler: notYet('TagResource') },
  { name: 'UntagResource', method: 'DELETE', path: '/2017-03-31/tags/:Resource', handler: notYet('UntagResource') },
];
