/**
 * The error registry: every stable error code Cocoon throws or answers, with its HTTP status and
 * what it means. `CocoonError` takes its status from here (a throw site may name another status
 * only where `also` lists it), the API's and the gateway's error bodies use these codes, and
 * docs/errors.md is generated from this table (`node scripts/errors-doc.ts`).
 * test/contracts/error-codes.test.ts fails when a code used in src/ is missing here, or when
 * docs/errors.md is not what this table renders.
 *
 * Adding a code: add an entry (keep the areas' alphabetical order), run
 * `node scripts/errors-doc.ts` to regenerate docs/errors.md, commit both.
 * Renaming or removing a code that clients may see is a breaking change: keep the old one
 * (pointing at the new one in its meaning) unless an issue asks for the change.
 *
 * The compatibility surfaces (src/compat/) answer in their own protocol's shapes (E2B's REST
 * `{code, message}` with numeric codes, Connect's codes such as `invalid_argument`, AWS's
 * exception names): those belong to the outside protocol and are listed in docs/e2b.md and
 * docs/aws.md, not here. What they throw as CocoonErrors is registered here.
 */

export interface ErrorSpec {
  /** The HTTP status an API or gateway answer carries. */
  readonly status: number;
  /** Other statuses some throw sites use for the same condition (each one documented). */
  readonly also?: readonly number[];
  /** Where it comes from: groups docs/errors.md. */
  readonly area: ErrorArea;
  /** What happened and what the user can do. */
  readonly meaning: string;
}

export type ErrorArea =
  | 'request'
  | 'auth'
  | 'tenants'
  | 'bundles'
  | 'images'
  | 'builder'
  | 'microvms'
  | 'gateway'
  | 'exec'
  | 'guest'
  | 'vmm'
  | 'storage'
  | 'server';

export const ERROR_AREAS: Record<ErrorArea, string> = {
  request: 'Any request (API and gateway): malformed or oversized input',
  auth: 'API keys and admin rights',
  tenants: 'Tenants and API keys',
  bundles: 'Bundles (uploads and references)',
  images: 'Images (create, build, delete)',
  builder: 'The builder: a bundle into a root disk (an image FAILED carries one of these)',
  microvms: 'MicroVMs (start, suspend, resume, fork, checkpoint)',
  gateway: 'The gateway (answers to web clients of a microVM)',
  exec: 'Exec, files and shell (API, WebSocket and gateway shell)',
  guest: 'Answers of the guest agent inside a microVM (passed through to exec and files)',
  vmm: 'The VMM (QEMU driver) and the guest control channel',
  storage: 'The metadata store and the object store',
  server: 'The server itself: configuration, start, shutdown',
};

export const ERROR_CODES = {
  // ---- request
  headers_too_large: { status: 431, area: 'request', meaning: 'The request head is larger than the server accepts.' },
  internal: { status: 500, area: 'request', meaning: 'An unexpected error on the server; the details are in the server log. Retry; report it if it persists. (The gateway and exec WebSockets answered `internal_error` before; it is the same code now.)' },
  invalid_request: { status: 400, area: 'request', meaning: 'The request is not valid: a field fails its schema (the message names it), the body is not JSON, or the HTTP is malformed.' },
  not_found: { status: 404, area: 'request', meaning: 'No route (or dashboard file) at this path.' },
  payload_too_large: { status: 413, area: 'request', meaning: 'The request body exceeds what this route accepts (the message says the limit).' },
  request_timeout: { status: 408, area: 'request', meaning: 'The request did not arrive in time.' },
  unsupported_media_type: { status: 415, area: 'request', meaning: 'The body has a content type this route does not take (the message names the accepted ones).' },
  upgrade_required: { status: 426, area: 'request', meaning: 'This URL is a WebSocket: open it with an upgrade.' },
  uri_too_long: { status: 414, area: 'request', meaning: 'A path parameter is longer than the server accepts.' },

  // ---- auth
  forbidden: { status: 403, area: 'auth', meaning: 'The API key may not do this (admin-only routes).' },
  unauthenticated: { status: 401, area: 'auth', meaning: 'No API key, or an unknown or revoked one: send `Authorization: Bearer <key>`.' },

  // ---- tenants
  api_key_not_found: { status: 404, area: 'tenants', meaning: 'No active API key with this id for this tenant.' },
  last_api_key: { status: 409, area: 'tenants', meaning: 'Revoking this key would leave the tenant without one: create another first.' },
  tenant_exists: { status: 409, area: 'tenants', meaning: 'A tenant with this name exists already.' },
  tenant_not_found: { status: 404, area: 'tenants', meaning: 'No tenant with this id.' },

  // ---- bundles
  bundle_not_found: { status: 404, area: 'bundles', meaning: 'The bundle URI names no stored bundle (of this tenant).' },
  bundle_too_large: { status: 413, area: 'bundles', meaning: 'The bundle is larger than the server accepts (`COCOON_BUNDLE_MAX_BYTES`).' },
  bundle_unpack_failed: { status: 500, area: 'bundles', meaning: 'The server could not unpack the bundle into a build context (disk or permissions on the server).' },
  invalid_bundle: { status: 400, area: 'bundles', meaning: 'The archive is not a valid bundle: bad gzip/tar/zip, an unsafe entry (absolute path, `..`, link out of the bundle), or over a limit (entries, sizes, depth).' },
  invalid_bundle_uri: { status: 400, area: 'bundles', meaning: 'The bundle reference is neither a `cocoon://bundles/…` URI from POST /bundles nor a valid `s3://bucket/key`.' },
  s3_not_configured: { status: 400, area: 'bundles', meaning: 'An `s3://` bundle was named but this server has no S3 configured: upload the bundle with POST /bundles.' },
  upload_failed: { status: 400, area: 'bundles', meaning: 'The upload did not complete (the client went away or the body broke off).' },

  // ---- images
  build_cancelled: { status: 409, area: 'images', meaning: 'The build was cancelled (the image was deleted or the server stopped).' },
  build_failed: { status: 422, area: 'images', meaning: 'The Dockerfile did not build; the build log says why.' },
  build_queue_full: { status: 429, area: 'images', meaning: 'Too many images wait for a builder (`COCOON_IMAGE_QUEUE_MAX`); retry once some are built.' },
  build_timeout: { status: 408, area: 'images', meaning: 'The build took too long and was stopped.' },
  checkpoint_failed: { status: 500, area: 'images', meaning: 'A checkpoint image could not be made (its image is FAILED with this reason); the source microVM runs on.' },
  http_hook_failed: { status: 422, area: 'images', meaning: 'An HTTP hook of the image (e.g. ready or validate) did not answer 200 in time, or answered a failure; the message says which and shows the serial console.' },
  image_deleted: { status: 409, area: 'images', meaning: 'The image was deleted while it was being built or used.' },
  image_in_use: { status: 409, area: 'images', meaning: 'MicroVMs still use this image: terminate them first.' },
  image_not_found: { status: 404, also: [409], area: 'images', meaning: 'No image with this id or ARN for this tenant. 409 when a microVM\'s image was deleted and it cannot be forked or checkpointed.' },
  image_not_ready: { status: 409, area: 'images', meaning: 'The image is not READY yet (or FAILED): a microVM starts from a READY image.' },
  readiness_failed: { status: 422, area: 'images', meaning: 'The app did not become ready during the build (the message holds the last lines of the serial console).' },
  server_restarted: { status: 500, area: 'images', meaning: 'Reason of an image FAILED because the server restarted during its build or checkpoint; create it again.' },

  // ---- builder
  base_image_seed_failed: { status: 500, area: 'builder', meaning: 'The local base images (busybox, debian:bookworm-slim) could not be seeded; run `npm run setup`.' },
  buildah_failed: { status: 500, area: 'builder', meaning: 'A buildah command failed (outside the Dockerfile\'s own steps).' },
  command_failed: { status: 500, area: 'builder', meaning: 'A host command the builder runs failed (its stderr is in the details).' },
  disk_failed: { status: 500, area: 'builder', meaning: 'mkfs.ext4 could not make the root disk.' },
  disk_too_small: { status: 422, area: 'builder', meaning: 'The image\'s files do not fit its `diskMiB`: ask for more.' },
  invalid_build_arg: { status: 400, area: 'builder', meaning: 'A build argument name is not valid.' },
  invalid_disk_size: { status: 400, area: 'builder', meaning: '`diskMiB` is out of range.' },
  invalid_image: { status: 422, area: 'builder', meaning: 'The built image is unusable (e.g. symbolic links that do not resolve in it).' },
  invalid_workload: { status: 422, also: [400], area: 'builder', meaning: 'The image\'s command, environment or hooks cannot be run (NUL bytes, too many, too large); 400 for a hook name in the request.' },
  missing_dockerfile: { status: 400, area: 'builder', meaning: 'The bundle has no Dockerfile at its root.' },
  no_command: { status: 422, area: 'builder', meaning: 'The image has neither ENTRYPOINT nor CMD.' },
  unknown_user: { status: 400, also: [422], area: 'builder', meaning: 'A user named by the image (USER, 422) or an exec request (400) does not exist in the image.' },

  // ---- microvms
  fork_failed: { status: 500, area: 'microvms', meaning: 'A fork point could not be taken; the source microVM runs on as before.' },
  host_lost: { status: 502, area: 'microvms', meaning: 'The microVM was running (or starting, resuming, suspending) on a host that stopped heartbeating and was declared dead: it is FAILED and its memory is lost; its error starts with `host_lost:` and names the host (docs/cluster.md). A SUSPENDED microVM of that host is not affected.' },
  idempotency_conflict: { status: 409, area: 'microvms', meaning: 'This `clientToken` started a microVM with other parameters: use a new token.' },
  lease_lost: { status: 409, area: 'microvms', meaning: 'This host no longer holds the microVM\'s lease (another host took it over, or declared this one dead): it stops its copy of the VM. Retry: the request reaches the new owner.' },
  microvm_failed: { status: 502, also: [409], area: 'microvms', meaning: 'The microVM is FAILED (its state says why). 502 from the gateway, 409 for an API operation on it.' },
  microvm_not_forkable: { status: 409, area: 'microvms', meaning: 'Only a RUNNING or SUSPENDED microVM can be forked or checkpointed.' },
  microvm_not_found: { status: 404, area: 'microvms', meaning: 'No microVM with this id or ARN for this tenant (gateway: none with this id).' },
  microvm_not_running: { status: 409, area: 'microvms', meaning: 'The microVM is not running and cannot be woken for this call.' },
  microvm_on_other_host: { status: 409, area: 'microvms', meaning: 'Another live host runs the microVM (its id and API URL are in the details): the request is forwarded there (docs/cluster.md).' },
  microvm_suspended: { status: 409, area: 'microvms', meaning: 'The microVM is SUSPENDED with `autoResumeEnabled: false`: resume it with POST /microvms/{id}/resume.' },
  microvm_terminated: { status: 410, also: [409], area: 'microvms', meaning: 'The microVM is terminated (or terminating). 410 from the gateway; 409 for API calls that need a live microVM.' },
  no_host_capacity: { status: 503, area: 'microvms', meaning: 'No live host of the cluster has room for the microVM\'s vCPUs, memory and disk: retry once others were suspended or terminated, or add a host.' },
  resume_failed: { status: 503, area: 'microvms', meaning: 'The microVM could not be resumed from its snapshot.' },
  token_not_found: { status: 404, area: 'microvms', meaning: 'The microVM has no token with this id.' },
  wake_failed: { status: 502, also: [503], area: 'microvms', meaning: 'A request could not wake the microVM (503 while its state does not settle).' },

  // ---- gateway
  gateway_closing: { status: 503, area: 'gateway', meaning: 'The gateway is shutting down; retry against the next one.' },
  gateway_unavailable: { status: 503, area: 'gateway', meaning: 'The gateway could not check this request (its store did not answer); retry shortly.' },
  invalid_host: { status: 400, area: 'gateway', meaning: 'The Host header is missing, repeated or not a host name.' },
  invalid_microvm_id: { status: 400, area: 'gateway', meaning: 'The microVM id in Host or X-Cocoon-MicroVM is not a valid id.' },
  invalid_port: { status: 400, area: 'gateway', meaning: 'A port (X-Cocoon-Port, an image\'s port, a host port) is not 1-65535.' },
  invalid_request_target: { status: 400, area: 'gateway', meaning: 'The request target is not a path (origin-form).' },
  microvm_busy: { status: 503, area: 'gateway', meaning: 'The microVM has too many requests or WebSockets in flight; retry shortly (Retry-After).' },
  microvm_mismatch: { status: 400, area: 'gateway', meaning: 'The Host header and X-Cocoon-MicroVM name different microVMs.' },
  microvm_moved: { status: 503, area: 'gateway', meaning: 'A request forwarded by another host of the cluster found the microVM owned elsewhere by now (it moved meanwhile); retry (Retry-After): the next request goes to its new host.' },
  microvm_not_specified: { status: 404, area: 'gateway', meaning: 'The request names no microVM (neither `<id>.<domain>` nor X-Cocoon-MicroVM).' },
  no_app_port: { status: 409, area: 'gateway', meaning: 'The microVM\'s image has no app port (`"port": null`): use exec, or name a port with X-Cocoon-Port.' },
  port_not_allowed: { status: 403, area: 'gateway', meaning: 'The token does not allow this port.' },
  peer_auth_failed: { status: 401, area: 'gateway', meaning: 'A request carried X-Cocoon-Peer (the header one host of a cluster signs when it forwards to another) and it failed the check: malformed, outside the time window, replayed, or signed with another key. Clients never send this header (docs/cluster.md).' },
  peer_unreachable: { status: 502, also: [503], area: 'gateway', meaning: 'The host of the cluster that runs the microVM did not answer a forwarded request (API or gateway); retry shortly. 503 while that host is still heartbeating but not reachable.' },
  port_not_exposed: { status: 404, area: 'gateway', meaning: 'The microVM does not expose this port.' },
  request_body_timeout: { status: 408, area: 'gateway', meaning: 'The client stopped sending the request body.' },
  request_body_too_large: { status: 413, area: 'gateway', meaning: 'The request body exceeds the gateway\'s limit.' },
  token_expired: { status: 401, area: 'gateway', meaning: 'The token has expired: create a new one (POST /microvms/{id}/tokens).' },
  token_invalid: { status: 401, area: 'gateway', meaning: 'The token is not valid (unknown).' },
  token_malformed: { status: 401, area: 'gateway', meaning: 'The token is not a well-formed Cocoon token (`cocoon_tk_…`), or the URL carries several.' },
  token_missing: { status: 401, area: 'gateway', meaning: 'No token: send X-Cocoon-Token (or open the URL with `?cocoon_token=`).' },
  token_revoked: { status: 401, area: 'gateway', meaning: 'The token was revoked.' },
  token_scope: { status: 403, area: 'gateway', meaning: 'The token\'s scope does not cover this (e.g. a shell needs a token with scope `shell`).' },
  token_wrong_microvm: { status: 403, area: 'gateway', meaning: 'The token belongs to another microVM.' },
  upstream_timeout: { status: 504, area: 'gateway', meaning: 'The microVM\'s app did not answer in time.' },
  upstream_unavailable: { status: 502, area: 'gateway', meaning: 'The microVM exposes no route to its app port (yet).' },
  upstream_unreachable: { status: 502, area: 'gateway', meaning: 'The gateway could not connect to the microVM\'s app (nothing listens on the port).' },
  wake_timeout: { status: 503, area: 'gateway', meaning: 'The microVM is still waking up; retry shortly (Retry-After).' },

  // ---- exec
  agent_closed: { status: 503, area: 'exec', meaning: 'The guest agent channel closed (the microVM was suspended or stopped).' },
  agent_gone: { status: 503, area: 'exec', meaning: 'The guest agent went away during the call (the microVM stopped or was suspended).' },
  agent_protocol_error: { status: 502, area: 'exec', meaning: 'The guest agent answered something the host did not expect; the channel was closed.' },
  agent_timeout: { status: 504, area: 'exec', meaning: 'The guest agent did not answer in time.' },
  agent_unavailable: { status: 503, area: 'exec', meaning: 'The guest agent cannot be reached (the image predates it, or the microVM is not up).' },
  agent_version_mismatch: { status: 503, area: 'exec', meaning: 'The guest agent speaks another protocol version than this host: rebuild the image.' },
  guest_error: { status: 500, area: 'exec', meaning: 'The guest agent refused with a code this host does not know (the message is the guest\'s).' },
  invalid_env: { status: 400, area: 'exec', meaning: 'An environment variable name is not valid.' },
  invalid_mode: { status: 400, area: 'exec', meaning: 'A file mode is not octal permission bits such as 0644.' },
  shutting_down: { status: 503, area: 'exec', meaning: 'The server is shutting down; exec sessions are ended.' },
  stream_ended: { status: 409, area: 'exec', meaning: 'The session\'s stream has ended already.' },
  too_many_items: { status: 413, area: 'exec', meaning: 'A directory listing or watch returned more entries than allowed: narrow the request.' },
  too_many_sessions: { status: 429, area: 'exec', meaning: 'The microVM has too many exec sessions and transfers open; retry once some end.' },

  // ---- guest (codes the guest agent sends; src/guest/init/agent.c)
  command_not_found: { status: 400, area: 'guest', meaning: 'The program to run does not exist in the microVM.' },
  cross_device: { status: 400, area: 'guest', meaning: 'A move across file systems in the guest.' },
  detached: { status: 409, area: 'guest', meaning: 'The process is detached from this session.' },
  directory_not_empty: { status: 409, area: 'guest', meaning: 'The directory is not empty.' },
  exec_failed: { status: 400, area: 'guest', meaning: 'The program could not be started (not executable, bad format).' },
  file_exists: { status: 409, area: 'guest', meaning: 'A file exists at this path already.' },
  file_not_found: { status: 404, area: 'guest', meaning: 'No file at this path in the microVM.' },
  guest_io_error: { status: 500, area: 'guest', meaning: 'An I/O error inside the guest.' },
  invalid_cwd: { status: 400, area: 'guest', meaning: 'The working directory does not exist or is not a directory.' },
  invalid_path: { status: 400, area: 'guest', meaning: 'A guest path is not absolute, holds NUL bytes or is too long.' },
  invalid_signal: { status: 400, area: 'guest', meaning: 'Unknown signal name: use one such as SIGTERM, SIGINT or SIGKILL.' },
  invalid_user: { status: 400, area: 'guest', meaning: '`user` is neither a user name nor a numeric uid.' },
  is_a_directory: { status: 400, area: 'guest', meaning: 'The path is a directory where a file was expected.' },
  no_shell: { status: 400, area: 'guest', meaning: 'The image has no /bin/sh: send the command as a list of arguments.' },
  not_a_directory: { status: 400, area: 'guest', meaning: 'A path component is not a directory.' },
  not_a_tty: { status: 400, area: 'guest', meaning: 'A terminal operation (resize) on a process without a PTY.' },
  path_too_long: { status: 400, also: [500], area: 'guest', meaning: 'A path is too long (500: the server\'s run directory is too long for unix sockets; use a shorter data directory).' },
  permission_denied: { status: 403, area: 'guest', meaning: 'The guest user may not do this.' },
  process_exited: { status: 409, area: 'guest', meaning: 'The process has exited already.' },
  process_not_found: { status: 404, area: 'guest', meaning: 'No such process in this microVM.' },
  protocol_error: { status: 500, area: 'guest', meaning: 'The guest agent could not parse what the host sent.' },
  read_only: { status: 409, area: 'guest', meaning: 'The file system is read-only.' },
  too_many_processes: { status: 429, area: 'guest', meaning: 'Too many processes run through exec at once in this microVM.' },
  too_many_streams: { status: 429, area: 'guest', meaning: 'The guest agent has no free stream.' },
  unknown_op: { status: 500, area: 'guest', meaning: 'The guest agent does not know the operation (an older agent): rebuild the image.' },

  // ---- vmm
  aborted: { status: 500, area: 'vmm', meaning: 'A wait on the guest was cancelled (the VM is being stopped).' },
  compaction_failed: { status: 500, area: 'vmm', meaning: 'The disk layers of a microVM could not be folded.' },
  disk_layer_failed: { status: 500, area: 'vmm', meaning: 'A qcow2 disk layer could not be made or rebased.' },
  egress_unguarded: { status: 503, area: 'vmm', meaning: 'A VM with egress needs the host firewall guard, which cannot be installed here (run as root with iptables, or `COCOON_EGRESS_GUARD=off`).' },
  guest_command_failed: { status: 500, area: 'vmm', meaning: 'cocoon-init refused a control command (clock, RNG, hook).' },
  guest_timeout: { status: 500, area: 'vmm', meaning: 'The guest did not answer on its control channel in time.' },
  helper_missing: { status: 500, area: 'vmm', meaning: 'The native sparse-file helper is not built: run `npm run setup`.' },
  invalid_resources: { status: 400, area: 'vmm', meaning: '`vcpus` or `memoryMiB` is out of range.' },
  invalid_vm_id: { status: 400, area: 'vmm', meaning: 'A VM id is not 1-63 of [a-z0-9-].' },
  kernel_missing: { status: 500, area: 'vmm', meaning: 'The guest kernel or cocoon-init is not built: run `npm run setup`.' },
  kvm_unavailable: { status: 500, area: 'vmm', meaning: '`COCOON_ACCEL=kvm` but /dev/kvm is missing or unusable.' },
  no_space: { status: 507, area: 'vmm', meaning: 'No space left on the disk of the data directory (or in the guest): free space.' },
  port_in_use: { status: 409, area: 'vmm', meaning: 'The host port is in use already.' },
  port_forward_failed: { status: 502, area: 'vmm', meaning: 'QEMU could not forward a guest port on demand (a request named a port not forwarded yet).' },
  port_not_forwarded: { status: 500, area: 'vmm', meaning: 'The guest port has no host forward on this VM.' },
  qemu_no_access: { status: 500, area: 'vmm', meaning: 'QEMU runs as an unprivileged user and cannot reach a file it needs (the message says which and how to fix it).' },
  qemu_user_failed: { status: 500, area: 'vmm', meaning: 'The system user for QEMU could not be created or read.' },
  qmp_error: { status: 500, area: 'vmm', meaning: 'QEMU refused a QMP command (the message has its error class and description).' },
  qmp_timeout: { status: 500, area: 'vmm', meaning: 'QEMU did not answer a QMP command in time.' },
  ram_clone_failed: { status: 500, area: 'vmm', meaning: 'The guest memory file could not be cloned for a restore.' },
  snapshot_incompatible: { status: 422, area: 'vmm', meaning: 'The snapshot was made by another VMM or for another architecture than this host runs (its manifest says which).' },
  guest_protocol_unsupported: { status: 422, area: 'vmm', meaning: 'The guest (or the snapshot it was made from) speaks a control-channel protocol version this host does not; rebuild the image.' },
  snapshot_corrupt: { status: 422, area: 'vmm', meaning: 'The snapshot is damaged (checksum or QEMU refused its state); earlier snapshots are untouched.' },
  snapshot_exists: { status: 409, area: 'vmm', meaning: 'A snapshot exists already at the target.' },
  snapshot_failed: { status: 500, area: 'vmm', meaning: 'QEMU could not save the VM state.' },
  snapshot_not_found: { status: 404, area: 'vmm', meaning: 'No snapshot where one was expected.' },
  sparse_helper_failed: { status: 500, area: 'vmm', meaning: 'The native sparse-file helper failed to copy a file.' },
  vm_adopt_failed: { status: 500, area: 'vmm', meaning: 'The daemon could not reconnect to a running QEMU after a restart.' },
  vm_connect_failed: { status: 500, area: 'vmm', meaning: 'The QMP socket of a VM could not be reached.' },
  vm_gone: { status: 500, also: [409], area: 'vmm', meaning: 'The VM\'s QEMU went away during the operation.' },
  vm_killed: { status: 503, area: 'vmm', meaning: 'QEMU was killed from outside Cocoon while booting or restoring.' },
  vm_not_running: { status: 409, area: 'vmm', meaning: 'The VM is not running (QEMU says so); it cannot be forked now.' },
  vm_start_failed: { status: 500, area: 'vmm', meaning: 'QEMU did not start (the message has its error output).' },

  // ---- storage
  database_schema_mismatch: { status: 500, area: 'storage', meaning: 'The database\'s recorded migrations differ from this Cocoon\'s.' },
  database_too_new: { status: 500, area: 'storage', meaning: 'The database was made by a newer Cocoon: run that version.' },
  database_unavailable: { status: 503, area: 'storage', meaning: 'The PostgreSQL database that `COCOON_DATABASE_URL` names cannot be reached: check the URL and that the server runs.' },
  invalid_bucket_name: { status: 400, area: 'storage', meaning: 'An S3 bucket name is not valid.' },
  invalid_cursor: { status: 400, area: 'storage', meaning: 'The pagination cursor is not one this API returned: start again without it.' },
  invalid_object_key: { status: 400, area: 'storage', meaning: 'An object-store key is not valid (empty, `..`, too long).' },
  object_not_found: { status: 404, area: 'storage', meaning: 'No object at this key in the object store.' },
  object_store_error: { status: 502, area: 'storage', meaning: 'The object store (S3) answered an error.' },
  object_store_unavailable: { status: 503, area: 'storage', meaning: 'The S3 endpoint cannot be reached.' },
  object_too_large: { status: 413, area: 'storage', meaning: 'An object is larger than the reader accepts.' },

  // ---- server
  invalid_config: { status: 500, area: 'server', meaning: 'A setting (a `COCOON_*` variable or a limit) has a bad value; the server refuses to start and the message names it (docs/configuration.md). Formerly also `invalid_configuration`.' },
  not_ready: { status: 503, area: 'server', meaning: 'A part of the server has not started yet; retry shortly.' },
  server_stopped: { status: 503, area: 'server', meaning: 'The server stopped during the operation; do it again.' },
  unavailable: { status: 503, area: 'server', meaning: 'A service of the server is not running (stopping or not started).' },
} as const satisfies Record<string, ErrorSpec>;

export type ErrorCode = keyof typeof ERROR_CODES;

const REGISTRY: Readonly<Record<string, ErrorSpec>> = ERROR_CODES;

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.hasOwn(REGISTRY, value);
}

export function errorSpec(code: ErrorCode): ErrorSpec {
  return REGISTRY[code]!;
}

/** The HTTP status of a code (its registered one). */
export function errorStatus(code: ErrorCode): number {
  return REGISTRY[code]!.status;
}
