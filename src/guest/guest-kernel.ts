import type { Config } from '../core/config.js'
import { DebianCloudKernel } from './debian-cloud-kernel.js'
import { KernelCache } from './kernel-cache.js'

/** The one place that maps `kernel.source` from the configuration to a kernel source. */
export function createKernelSource (config: Config): KernelCache | DebianCloudKernel {
  return config.kernel.source === 'debian-cloud' ? new DebianCloudKernel(config.cacheDir) : new KernelCache(config.cacheDir)
}
