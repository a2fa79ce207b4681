import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { mkdir, readFile, realpath, rm, symlink, writeFile } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { test } from 'node:test'
import { promisify } from 'node:util'

import { UigniterError } from '../../src/core/errors.js'
import { readElf } from '../../src/guest/elf-file.js'
import { resolveLibraries, type ResolvedLibrary } from '../../src/guest/library-resolver.js'
import { rejectsWith, tempDir } from '../helpers/assertions.js'

const run = promisify(execFile)

/**
 * Builds lib<name>.so.1.0.0 with soname lib<name>.so.1 in `dir`, plus the
 * usual symlinks lib<name>.so.1 and lib<name>.so, exporting `int <name>(void)`.
 */
async function buildLibrary (dir: string, name: string, body: string, linkArgs: string[] = []): Promise<void> {
  await mkdir(dir, { recursive: true })
  const source = join(dir, `${name}.c`)
  await writeFile(source, body)
  await run('gcc', ['-shared', '-fPIC', `-Wl,-soname,lib${name}.so.1`, '-o', join(dir, `lib${name}.so.1.0.0`), source, ...linkArgs])
  await symlink(`lib${name}.so.1.0.0`, join(dir, `lib${name}.so.1`))
  await symlink(`lib${name}.so.1`, join(dir, `lib${name}.so`))
}

/** Builds an executable calling foo() and printing its result. */
async function buildApp (dir: string, linkArgs: string[]): Promise<string> {
  const source = join(dir, 'app.c')
  await writeFile(source, '#include <stdio.h>\nint foo(void);\nint main(void) { printf("%d\\n", foo()); return 0; }\n')
  const app = join(dir, 'app')
  await run('gcc', ['-o', app, source, ...linkArgs])
  return app
}

function byName (libraries: ResolvedLibrary[], name: string): ResolvedLibrary | undefined {
  return libraries.find((library) => basename(library.guestPath) === name)
}

/** What ld.so says (trusted system binaries only): needed name -> path it loads. */
async function lddMap (path: string): Promise<Map<string, string>> {
  const { stdout } = await run('ldd', [path])
  const map = new Map<string, string>()
  for (const match of stdout.matchAll(/^\s*(\S+) => (\/\S+)/gm)) map.set(match[1] ?? '', match[2] ?? '')
  return map
}

async function assertClosed (executable: string, libraries: ResolvedLibrary[]): Promise<void> {
  const guestPaths = libraries.map((library) => library.guestPath)
  assert.equal(new Set(guestPaths).size, guestPaths.length, `duplicates in ${guestPaths.join(', ')}`)
  const names = new Set(guestPaths.map((path) => basename(path)))
  for (const library of libraries) {
    assert.equal(library.hostPath, await realpath(library.guestPath))
    const soname = (await readElf(library.hostPath)).soname
    if (soname !== undefined) names.add(soname)
  }
  // Every object's DT_NEEDED is satisfied by something in the list: the closure is transitive.
  for (const object of [executable, ...libraries.map((library) => library.hostPath)]) {
    for (const needed of (await readElf(object)).needed) {
      assert.ok(names.has(needed), `${needed} (needed by ${object}) is missing from ${guestPaths.join(', ')}`)
    }
  }
}

void test('memcached: interpreter first, then libc, libevent and the rest, as ld.so loads them', async () => {
  const libraries = await resolveLibraries('/usr/bin/memcached')
  assert.deepEqual(libraries[0], {
    guestPath: '/lib64/ld-linux-x86-64.so.2',
    hostPath: await realpath('/lib64/ld-linux-x86-64.so.2')
  })
  assert.ok(byName(libraries, 'libc.so.6'))
  assert.ok(libraries.some((library) => basename(library.guestPath).startsWith('libevent')))
  for (const [name, path] of await lddMap('/usr/bin/memcached')) {
    assert.equal(byName(libraries, name)?.guestPath, path, `ldd loads ${name} from ${path}`)
  }
  await assertClosed('/usr/bin/memcached', libraries)
})

void test('node: the same libraries as ldd, each once', async () => {
  const libraries = await resolveLibraries(process.execPath)
  const ldd = await lddMap(process.execPath)
  for (const [name, path] of ldd) {
    assert.equal(byName(libraries, name)?.guestPath, path, `ldd loads ${name} from ${path}`)
  }
  // The interpreter plus what ldd maps; libc's NEEDED on ld-linux is the interpreter, not a second copy.
  assert.equal(libraries.length, ldd.size + 1, libraries.map((library) => library.guestPath).join(', '))
  await assertClosed(process.execPath, libraries)
})

void test('a static executable needs nothing', async (t) => {
  const dir = await tempDir(t, 'uigniter-libs-')
  await writeFile(join(dir, 'static.c'), 'int main(void) { return 0; }\n')
  await run('gcc', ['-static', '-o', join(dir, 'static'), join(dir, 'static.c')])
  assert.deepEqual(await resolveLibraries(join(dir, 'static')), [])
})

void test('$ORIGIN: libraries next to the app are found, transitively, under their soname', async (t) => {
  const dir = await tempDir(t, 'uigniter-libs-')
  const lib = join(dir, 'lib')
  await buildLibrary(lib, 'bar', 'int bar(void) { return 41; }\n')
  await buildLibrary(lib, 'foo', 'int bar(void);\nint foo(void) { return bar() + 1; }\n', ['-L', lib, '-lbar', '-Wl,-rpath,$ORIGIN'])
  const app = await buildApp(dir, ['-L', lib, '-lfoo', '-Wl,-rpath,$ORIGIN/lib'])
  // The real loader agrees that this app runs, so what we resolve is what it loads.
  assert.equal((await run(app)).stdout, '42\n')

  const libraries = await resolveLibraries(app)
  assert.deepEqual(byName(libraries, 'libfoo.so.1'), { guestPath: join(lib, 'libfoo.so.1'), hostPath: join(lib, 'libfoo.so.1.0.0') })
  assert.deepEqual(byName(libraries, 'libbar.so.1'), { guestPath: join(lib, 'libbar.so.1'), hostPath: join(lib, 'libbar.so.1.0.0') })
  assert.ok(byName(libraries, 'libc.so.6'))
  await assertClosed(app, libraries)

  // Started through a symlink elsewhere, $ORIGIN is still the real binary's directory (ld.so reads /proc/self/exe).
  const elsewhere = join(dir, 'elsewhere')
  await mkdir(elsewhere)
  await symlink(app, join(elsewhere, 'app'))
  assert.equal((await run(join(elsewhere, 'app'))).stdout, '42\n')
  assert.deepEqual(await resolveLibraries(join(elsewhere, 'app')), libraries)

  await rm(join(lib, 'libbar.so.1'))
  await rejectsWith(resolveLibraries(app), 'UIG_ERR_IMAGE_LIBRARY_NOT_FOUND',
    'libbar.so.1 (needed by ' + join(lib, 'libfoo.so.1') + ')', `${lib}, `, '/lib/x86_64-linux-gnu')

  await rm(join(lib, 'libfoo.so.1'))
  await rejectsWith(resolveLibraries(app), 'UIG_ERR_IMAGE_LIBRARY_NOT_FOUND',
    `libfoo.so.1 (needed by ${app}) was not found in: ${lib}, `, 'install the package that provides it')
})

void test('DT_RPATH of the executable serves its libraries too; DT_RUNPATH does not (as in ld.so)', async (t) => {
  const dir = await tempDir(t, 'uigniter-libs-')
  const deps = join(dir, 'deps')
  await buildLibrary(deps, 'bar', 'int bar(void) { return 6; }\n')
  // libfoo needs libbar but has no search path of its own.
  await buildLibrary(deps, 'foo', 'int bar(void);\nint foo(void) { return bar() * 7; }\n', ['-L', deps, '-lbar'])

  const withRpath = await buildApp(dir, ['-L', deps, '-Wl,-rpath-link,' + deps, '-lfoo', '-Wl,--disable-new-dtags', '-Wl,-rpath,$ORIGIN/deps'])
  assert.deepEqual((await readElf(withRpath)).rpath, ['$ORIGIN/deps'])
  assert.equal((await run(withRpath)).stdout, '42\n')
  const libraries = await resolveLibraries(withRpath)
  assert.equal(byName(libraries, 'libbar.so.1')?.guestPath, join(deps, 'libbar.so.1'))

  await rm(withRpath)
  const withRunpath = await buildApp(dir, ['-L', deps, '-Wl,-rpath-link,' + deps, '-lfoo', '-Wl,--enable-new-dtags', '-Wl,-rpath,$ORIGIN/deps'])
  assert.deepEqual((await readElf(withRunpath)).runpath, ['$ORIGIN/deps'])
  await assert.rejects(run(withRunpath), /libbar\.so\.1/)
  await rejectsWith(resolveLibraries(withRunpath), 'UIG_ERR_IMAGE_LIBRARY_NOT_FOUND', 'libbar.so.1 (needed by ' + join(deps, 'libfoo.so.1'))
})

void test('searchPaths are searched, in order, and candidates that are not x86-64 are skipped', async (t) => {
  const dir = await tempDir(t, 'uigniter-libs-')
  const good = join(dir, 'good')
  const wrong = join(dir, 'wrong')
  await buildLibrary(good, 'foo', 'int foo(void) { return 1; }\n')
  const app = await buildApp(dir, ['-L', good, '-lfoo'])

  await rejectsWith(resolveLibraries(app), 'UIG_ERR_IMAGE_LIBRARY_NOT_FOUND', 'libfoo.so.1', 'pass its directory')
  assert.equal(byName(await resolveLibraries(app, { searchPaths: [good] }), 'libfoo.so.1')?.guestPath, join(good, 'libfoo.so.1'))

  // An AArch64 build of the same library (e_machine patched to 183) earlier in the path is passed over.
  await mkdir(wrong)
  const bytes = await readFile(join(good, 'libfoo.so.1.0.0'))
  bytes.writeUInt16LE(183, 18)
  await writeFile(join(wrong, 'libfoo.so.1'), bytes)
  const libraries = await resolveLibraries(app, { searchPaths: [wrong, good] })
  assert.deepEqual(byName(libraries, 'libfoo.so.1'), { guestPath: join(good, 'libfoo.so.1'), hostPath: join(good, 'libfoo.so.1.0.0') })
  await rejectsWith(resolveLibraries(app, { searchPaths: [wrong] }), 'UIG_ERR_IMAGE_LIBRARY_NOT_FOUND',
    `skipped as not x86-64 ELF files: ${join(wrong, 'libfoo.so.1')}`)
})

void test('ld.so.conf: include globs are followed in order; comments and hwcap lines are ignored', async (t) => {
  const dir = await tempDir(t, 'uigniter-libs-')
  const first = join(dir, 'first')
  const second = join(dir, 'second')
  const excluded = join(dir, 'excluded')
  await buildLibrary(first, 'foo', 'int foo(void) { return 1; }\n')
  await buildLibrary(second, 'foo', 'int foo(void) { return 2; }\n')
  const app = await buildApp(dir, ['-L', first, '-lfoo'])

  await mkdir(join(dir, 'conf.d'))
  const conf = join(dir, 'ld.so.conf')
  await writeFile(conf, `# ${excluded} is only in a comment\nhwcap 0 nosegneg\ninclude conf.d/*.conf\n`)
  // Sorted like glob(3): 10-... before 20-..., whatever order they were created in.
  await writeFile(join(dir, 'conf.d', '20-second.conf'), `${second}\n`)
  await writeFile(join(dir, 'conf.d', '10-first.conf'), `  ${first}   # trailing comment\n`)
  await writeFile(join(dir, 'conf.d', 'disabled.conf.off'), `${excluded}\n`)

  const libraries = await resolveLibraries(app, { ldSoConf: conf })
  assert.equal(byName(libraries, 'libfoo.so.1')?.guestPath, join(first, 'libfoo.so.1'))

  await rm(join(first, 'libfoo.so.1'))
  assert.equal(byName(await resolveLibraries(app, { ldSoConf: conf }), 'libfoo.so.1')?.guestPath, join(second, 'libfoo.so.1'))

  await rm(join(second, 'libfoo.so.1'))
  await assert.rejects(resolveLibraries(app, { ldSoConf: conf }), (err: unknown) => {
    assert.ok(err instanceof UigniterError && err.code === 'UIG_ERR_IMAGE_LIBRARY_NOT_FOUND', String(err))
    assert.ok(err.message.includes(`${first}, ${second}, /lib/x86_64-linux-gnu`), err.message)
    assert.ok(!err.message.includes(excluded) && !err.message.includes('nosegneg'), err.message)
    return true
  })
})

void test('a missing interpreter or executable is reported', async (t) => {
  const dir = await tempDir(t, 'uigniter-libs-')
  await writeFile(join(dir, 'main.c'), 'int main(void) { return 0; }\n')
  await run('gcc', ['-o', join(dir, 'app'), join(dir, 'main.c'), '-Wl,--dynamic-linker=/nonexistent/ld-custom.so.1'])
  await rejectsWith(resolveLibraries(join(dir, 'app')), 'UIG_ERR_IMAGE_LIBRARY_NOT_FOUND', '/nonexistent/ld-custom.so.1', join(dir, 'app'))
  await rejectsWith(resolveLibraries(join(dir, 'missing')), 'UIG_ERR_IMAGE_PATH_NOT_FOUND')
})
