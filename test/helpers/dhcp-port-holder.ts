import { spawn } from 'node:child_process'

/**
 * Holds UDP port 67 on one interface only (SO_BINDTODEVICE), as another DHCP
 * server on that bridge would, without disturbing other bridges' servers.
 * Node cannot bind to one device, hence python3. Resolves once the port is
 * held; `release()` lets it go.
 */
export async function holdDhcpPort (device: string): Promise<{ release: () => Promise<void> }> {
  const holder = spawn('python3', ['-c', HOLD_PORT_67, device], { stdio: ['pipe', 'pipe', 'inherit'] })
  const exited = new Promise((resolve) => holder.once('exit', resolve))
  const release = async (): Promise<void> => {
    holder.kill()
    await exited
  }
  try {
    await new Promise<void>((resolve, reject) => {
      holder.stdout.once('data', () => resolve())
      holder.once('exit', (code) => reject(new Error(`the port holder exited with ${code}`)))
    })
  } catch (err) {
    await release()
    throw err
  }
  return { release }
}

const HOLD_PORT_67 = `
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
s.bind(('0.0.0.0', 67))
print('ready', flush=True)
sys.stdin.read()
`
