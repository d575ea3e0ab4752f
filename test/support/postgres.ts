/**
 * A private PostgreSQL server for tests: the shared module (src/cluster/local/postgres-server.ts)
 * with its test defaults: a new cluster under a temp directory (`cocoon-pg-*`, so the suite's
 * leak check sees one left behind), durability off, killed and removed when the test process
 * ends, whatever ended it.
 */
export { PostgresServer, postgresBinDir } from '../../src/cluster/local/postgres-server.ts';
