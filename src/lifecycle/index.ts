export { LifecycleEngine, type LifecycleOptions, type PausePoint } from './engine.ts';
export { recoverMicrovms, type RecoveryReport } from './recovery.ts';
