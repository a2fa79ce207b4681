import type { QemuVm } from '../../src/vmm/qemu/qemu-vm.js'

/** The guest's console lines (without \r) so far. */
export async function consoleLines (vm: QemuVm): Promise<string[]> {
  return (await vm.readConsole({ tailBytes: Infinity })).split('\n').map((l) => l.replace(/\r$/, ''))
}

/** The first console line matching `re`, waited for up to `timeoutMs`; the error shows the console's tail. */
export async function consoleLine (vm: QemuVm, re: RegExp, timeoutMs = 90_000): Promise<string> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const line = (await consoleLines(vm)).find((l) => re.test(l))
    if (line !== undefined) return line
    if (Date.now() > deadline) throw new Error(`no console line like ${re} within ${timeoutMs} ms:\n${(await vm.readConsole()).slice(-3000)}`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}
