/**
 * A microVM's activity as the gateway reports it: requests and WebSockets in flight and the
 * last moment of traffic. The idle policy reads it (`idleFor`); the engine writes the last
 * activity to the store now and then (`takeDirty`), where the scheduler's due times come from.
 */
export class Activity {
  inFlight = 0;
  webSockets = 0;
  /** ms since the epoch. */
  lastActivity: number;
  /** Traffic since the last write to the store. */
  dirty = false;

  constructor(lastActivity: number) {
    this.lastActivity = lastActivity;
  }

  requestStarted(now = Date.now()): void {
    this.inFlight++;
    this.lastActivity = now;
    this.dirty = true;
  }

  requestFinished(now = Date.now()): void {
    this.inFlight = Math.max(0, this.inFlight - 1);
    this.lastActivity = now;
    this.dirty = true;
  }

  webSocketOpened(now = Date.now()): void {
    this.webSockets++;
    this.lastActivity = now;
  }

  webSocketClosed(now = Date.now()): void {
    this.webSockets = Math.max(0, this.webSockets - 1);
    this.lastActivity = now;
    this.dirty = true;
  }

  /** Whether anything is in flight (a request or an open WebSocket): then it is never idle. */
  get busy(): boolean {
    return this.inFlight > 0 || this.webSockets > 0;
  }

  /** Whether the idle policy says: suspend now (nothing in flight, no traffic for `maxIdleMs`). */
  idleFor(maxIdleMs: number, now = Date.now()): boolean {
    return !this.busy && now - this.lastActivity >= maxIdleMs;
  }

  /** The last activity to write to the store, once per change (undefined: nothing new). */
  takeDirty(): Date | undefined {
    if (!this.dirty) return undefined;
    this.dirty = false;
    return new Date(this.lastActivity);
  }
}
