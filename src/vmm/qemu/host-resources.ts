import { cpus, totalmem } from 'node:os'
import { UigniterError } from '../../core/errors.js'

export interface HostCapacity { cpus: number, memoryBytes: number }

/** What this host has: logical CPUs and physical memory in all. */
export function hostCapacity (): HostCapacity {
  return { cpus: cpus().length, memoryBytes: totalmem() }
}

/**
 * Rejects a VM that can never run here: more vCPUs or memory than the host
 * has in all, or an affinity naming CPUs it lacks. Free memory is not
 * checked: guests touch their memory lazily, so several may share the host.
 * @example checkHostResources({ vcpus: 2, memoryMiB: 256 }) // throws UIG_ERR_VM_RESOURCES on a 1-CPU host
 */
export function checkHostResources (ask: { vcpus: number, memoryMiB: number, cpuAffinity?: number[] }, host: HostCapacity = hostCapacity()): void {
  if (!Number.isInteger(ask.vcpus) || ask.vcpus < 1 || ask.vcpus > host.cpus) {
    throw new UigniterError('UIG_ERR_VM_RESOURCES', `${ask.vcpus} vCPUs asked, but this host has ${host.cpus} CPUs: ask for 1 to ${host.cpus}`)
  }
  const hostMiB = Math.floor(host.memoryBytes / 1048576)
  if (!Number.isInteger(ask.memoryMiB) || ask.memoryMiB < 1 || ask.memoryMiB > hostMiB) {
    throw new UigniterError('UIG_ERR_VM_RESOURCES', `${ask.memoryMiB} MiB of memory asked, but this host has ${hostMiB} MiB in all`)
  }
  if (ask.cpuAffinity !== undefined) {
    const bad = ask.cpuAffinity.filter((c) => !Number.isInteger(c) || c < 0 || c >= host.cpus)
    if (ask.cpuAffinity.length === 0 || bad.length > 0) {
      throw new UigniterError('UIG_ERR_VM_RESOURCES', `CPU affinity ${JSON.stringify(ask.cpuAffinity)} names CPUs this host does not have: it has CPUs 0 to ${host.cpus - 1}`)
    }
  }
}
