/**
 * Serves the gateway's `/.cocoon/shell` WebSockets (src/gateway/shell.ts) with the exec
 * service: the gateway has checked the shell token and the route; here the socket is upgraded
 * and runs the interactive protocol (ws-session.ts) with a PTY forced on, as the microVM's owner.
 */
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer } from 'ws';
import { CocoonError } from '../common/errors.ts';
import { TOKEN_SUBPROTOCOL_PREFIX, type ShellHandler } from '../gateway/shell.ts';
import { getMicrovm } from '../store/microvms.ts';
import type { Db } from '../store/sql.ts';
import type { ExecService } from './types.ts';
import { MAX_WS_MESSAGE, defaultCommand, serveExecWebSocket } from './ws-session.ts';

export function createShellHandler(db: Db, exec: () => ExecService): { handler: ShellHandler; close(): void } {
  const wss = new WebSocketServer({
    noServer: true,
    maxPayload: MAX_WS_MESSAGE,
    // A browser that sent its token as a subprotocol needs one echoed to accept the socket.
    handleProtocols: (protocols) => [...protocols].find((p) => p.startsWith(TOKEN_SUBPROTOCOL_PREFIX)) ?? false,
  });
  const handler: ShellHandler = (microvmId: string, req: IncomingMessage, socket: Duplex, head: Buffer) => {
    wss.handleUpgrade(req, socket, head, (ws) => {
      serveExecWebSocket(ws, {
        forceTty: true,
        open: async (start) => {
          const microvm = await getMicrovm(db, microvmId);
          if (!microvm) throw new CocoonError('microvm_not_found', `microVM ${microvmId} does not exist`, { status: 404 });
          const { apiKey: _ignored, ...request } = start;
          return exec().exec(microvm.tenantId, microvmId, { ...request, command: defaultCommand(start) });
        },
      });
    });
  };
  return {
    handler,
    close() {
      for (const client of wss.clients) client.terminate();
      wss.close();
    },
  };
}
