export { LifecycleEngine, type LifecycleOptions, type PausePoint } from './engine.ts';
export { microvmModule, type MicrovmModule, type MicrovmModuleOptions } from './module.ts';
export { recoverMicrovms, type RecoveryReport } from './recovery.ts';
