import { posix } from 'node:path'

/** What {@link resolveModuleLoadOrder} found for a list of module names. */
export interface ModuleResolution {
  /** Module files (paths relative to /lib/modules/<release>, as in modules.dep), dependencies first. */
  load: string[]
  /** Names asked for that are built into the kernel, so nothing is loaded for them. */
  builtin: string[]
  /** Names asked for that the kernel has neither as a module nor built in. */
  missing: string[]
}

/**
 * `virtio-rng.ko.xz` → `virtio_rng`: the kernel treats `-` and `_` in module
 * names alike, and files may carry a compression suffix.
 */
function moduleName (path: string): string {
  return posix.basename(path).replace(/\.ko(?:\.(?:xz|zst|gz))?$/, '').replace(/-/g, '_')
}

/**
 * Resolves module names to the files to load, in an order where every module
 * comes after the modules it needs, from the text of depmod's `modules.dep`
 * (`path: dep dep ...`) and `modules.builtin` (one path a line). Each
 * dependency is visited through its own line, so the order does not rely on
 * how depmod sorted a line.
 */
export function resolveModuleLoadOrder (modulesDep: string, modulesBuiltin: string, names: string[]): ModuleResolution {
  const deps = new Map<string, string[]>()
  const byName = new Map<string, string>()
  for (const line of modulesDep.split('\n')) {
    const colon = line.indexOf(':')
    if (colon <= 0) continue
    const path = line.slice(0, colon).trim()
    deps.set(path, line.slice(colon + 1).trim().split(/\s+/).filter((d) => d !== ''))
    byName.set(moduleName(path), path)
  }
  const builtinNames = new Set(modulesBuiltin.split('\n').filter((l) => l.trim() !== '').map(moduleName))

  const result: ModuleResolution = { load: [], builtin: [], missing: [] }
  const seen = new Set<string>()
  const visit = (path: string): void => {
    if (seen.has(path)) return
    seen.add(path)
    for (const dep of deps.get(path) ?? []) visit(dep)
    result.load.push(path)
  }
  for (const raw of names) {
    const name = raw.replace(/-/g, '_')
    const path = byName.get(name)
    if (path !== undefined) visit(path)
    else if (builtinNames.has(name)) result.builtin.push(name)
    else result.missing.push(name)
  }
  return result
}
