/**
 * The model's 24 operations and what serves each (docs/aws.md has the table with the reasons).
 * Paths are the model's requestUri with Fastify labels.
 */
import type { OperationRoute } from './context.ts';
import { createMicrovmImage, deleteMicrovmImage, deleteMicrovmImageVersion, updateMicrovmImage, updateMicrovmImageVersion } from './image-writes.ts';
import {
  getMicrovmImage, getMicrovmImageBuild, getMicrovmImageVersion, listManagedMicrovmImageVersions, listManagedMicrovmImages,
  listMicrovmImageBuilds, listMicrovmImageVersions, listMicrovmImages,
} from './images.ts';
import { getMicrovm, listMicrovmsOperation, resumeMicrovm, runMicrovm, suspendMicrovm, terminateMicrovm } from './microvms.ts';
import { listTags, tagResource, untagResource } from './tags.ts';
import { createMicrovmAuthToken, createMicrovmShellAuthToken } from './tokens.ts';

const V = '/2025-09-09';
const IMAGE = `${V}/microvm-images/:imageIdentifier`;
const VERSION = `${IMAGE}/versions/:imageVersion`;
const MICROVM = `${V}/microvms/:microvmIdentifier`;

export const OPERATIONS: readonly OperationRoute[] = [
  { name: 'ListManagedMicrovmImages', method: 'GET', path: `${V}/managed-microvm-images`, handler: listManagedMicrovmImages },
  { name: 'ListManagedMicrovmImageVersions', method: 'GET', path: `${V}/managed-microvm-images/:imageIdentifier/versions`, handler: listManagedMicrovmImageVersions },
  { name: 'CreateMicrovmImage', method: 'POST', path: `${V}/microvm-images`, handler: createMicrovmImage },
  { name: 'ListMicrovmImages', method: 'GET', path: `${V}/microvm-images`, handler: listMicrovmImages },
  { name: 'GetMicrovmImage', method: 'GET', path: IMAGE, handler: getMicrovmImage },
  { name: 'UpdateMicrovmImage', method: 'PUT', path: IMAGE, handler: updateMicrovmImage },
  { name: 'DeleteMicrovmImage', method: 'DELETE', path: IMAGE, handler: deleteMicrovmImage },
  { name: 'ListMicrovmImageVersions', method: 'GET', path: `${IMAGE}/versions`, handler: listMicrovmImageVersions },
  { name: 'GetMicrovmImageVersion', method: 'GET', path: VERSION, handler: getMicrovmImageVersion },
  { name: 'UpdateMicrovmImageVersion', method: 'PATCH', path: VERSION, handler: updateMicrovmImageVersion },
  { name: 'DeleteMicrovmImageVersion', method: 'DELETE', path: VERSION, handler: deleteMicrovmImageVersion },
  { name: 'ListMicrovmImageBuilds', method: 'GET', path: `${VERSION}/builds`, handler: listMicrovmImageBuilds },
  { name: 'GetMicrovmImageBuild', method: 'GET', path: `${VERSION}/builds/:buildId`, handler: getMicrovmImageBuild },
  { name: 'RunMicrovm', method: 'POST', path: `${V}/microvms`, handler: runMicrovm },
  { name: 'ListMicrovms', method: 'GET', path: `${V}/microvms`, handler: listMicrovmsOperation },
  { name: 'GetMicrovm', method: 'GET', path: MICROVM, handler: getMicrovm },
  { name: 'TerminateMicrovm', method: 'DELETE', path: MICROVM, handler: terminateMicrovm },
  { name: 'SuspendMicrovm', method: 'POST', path: `${MICROVM}/suspend`, handler: suspendMicrovm },
  { name: 'ResumeMicrovm', method: 'POST', path: `${MICROVM}/resume`, handler: resumeMicrovm },
  { name: 'CreateMicrovmAuthToken', method: 'POST', path: `${MICROVM}/auth-token`, handler: createMicrovmAuthToken },
  { name: 'CreateMicrovmShellAuthToken', method: 'POST', path: `${MICROVM}/shell-auth-token`, handler: createMicrovmShellAuthToken },
  { name: 'ListTags', method: 'GET', path: '/2017-03-31/tags/:Resource', handler: listTags },
  { name: 'TagResource', method: 'POST', path: '/2017-03-31/tags/:Resource', handler: tagResource },
  { name: 'UntagResource', method: 'DELETE', path: '/2017-03-31/tags/:Resource', handler: untagResource },
];
