import { UigniterError } from '../core/errors.js'
import { run } from '../core/exec.js'
import { DEFAULT_FIREWALL_TABLE, type Firewall } from './firewall.js'
import { NOT_ROOT_ADVICE, runNetTool } from './net-tool.js'
import { NftFirewall } from './nft-firewall.js'

/**
 * Finds the firewall tool of this host, once per daemon start: nftables when
 * `nft` is installed and the kernel has nf_tables. Hosts with only iptables
 * are not supported yet and get a clear error naming the package to install.
 *
 * @example
 * const firewall = await detectFirewall()
 * await firewall.ensureBase({ bridge: 'uigniter0', subnet, nat: true })
 */
export async function detectFirewall (options: { table?: string } = {}): Promise<Firewall> {
  const table = options.table ?? DEFAULT_FIREWALL_TABLE
  if (await hasTool('nft')) {
    // Also proves the kernel has nf_tables and that we may use it.
    await runNetTool('nft', ['list', 'tables'])
    return new NftFirewall({ table })
  }
  if (process.geteuid?.() !== 0) {
    throw new UigniterError('UIG_ERR_HOST_NOT_ROOT', `cannot set up the firewall: ${NOT_ROOT_ADVICE}`)
  }
  const iptablesOnly = await hasTool('iptables')
  throw new UigniterError('UIG_ERR_HOST_MISSING_TOOL',
    (iptablesOnly
      ? 'this host has iptables but not nftables, and uigniter\'s firewall supports only nftables so far; '
      : 'neither nft nor iptables is installed; ') +
    'install nftables (apt-get install nftables; it coexists with iptables), or use network: user')
}

async function hasTool (tool: string): Promise<boolean> {
  try {
    await run(tool, ['--version'])
    return true
  } catch (err) {
    if (err instanceof UigniterError && err.code === 'UIG_ERR_HOST_MISSING_TOOL') return false
    // Installed but unhappy with --version: still installed.
    return true
  }
}
