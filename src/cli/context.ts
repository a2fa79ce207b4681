import { loadConfig, type Config } from '../core/config.js'
import { ImageBuilder } from '../guest/image-builder.js'
import { ImageStore } from '../guest/image-store.js'
import { KernelCache } from '../guest/kernel-cache.js'

/** The pieces a command works with, made from the validated configuration. */
export interface Context {
  config: Config
  store: ImageStore
  kernels: KernelCache
  builder: ImageBuilder
}

export function createContext (): Context {
  const config = loadConfig()
  const store = new ImageStore(config.dataDir)
  const kernels = new KernelCache(config.cacheDir)
  return { config, store, kernels, builder: new ImageBuilder(store, kernels) }
}
