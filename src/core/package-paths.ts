import { fileURLToPath } from 'node:url'

/** The project's root directory (compiled files live in dist/src/**, sources in src/**). */
export const packageRoot = fileURLToPath(new URL('../../../', import.meta.url))

/** The static guest init, compiled by scripts/setup.sh from src/guest/init/uigniter-init.c. */
export const initBinaryPath = `${packageRoot}build/uigniter-init`
