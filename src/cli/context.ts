import { loadConfig, type Config } from '../core/config.js'
import { createKernelSource } from '../guest/guest-kernel.js'
import { ImageBuilder } from '../guest/image-builder.js'
import { ImageStore } from '../guest/image-store.js'

/** The pieces a command works with, made from the validated configuration. */
export interface Context {
  config: Config
  store: ImageStore
  /** The guest kernel of `kernel.source`: our build, or Debian's cloud kernel. */
  kernels: ReturnType<typeof createKernelSource>
  builder: ImageBuilder
}

export function createContext (): Context {
  const config = loadConfig()
  const store = new ImageStore(config.dataDir)
  const kernels = createKernelSource(config)
  return { config, store, kernels, builder: new ImageBuilder(store, kernels) }
}
