import { UigniterError } from './errors.js'
import type { StartStep, StartTimings } from './vm.js'

/**
 * Every way a VM comes to run, as a list of named steps in the order they
 * run (firecracker-go-sdk's handler lists are the model). A path runs a
 * subset of its list: `after-clone` only with a hook, `warm-up` only for a
 * pool, `publish-ports` only with ports to publish. The VM's startTimings
 * list the steps it ran, each with its duration; a pool claim appends its
 * own steps to the instance's.
 */
export const START_PLANS = {
  /** Booted from the image; resolves once the VMM runs (the app boots on its own). */
  cold: ['resolve-image', 'check-resources', 'attach-network', 'spawn', 'publish-ports', 'record'],
  /** A pool instance spawned with its vCPUs stopped before the first instruction; the claim resumes it. */
  prespawned: ['resolve-image', 'check-resources', 'attach-network', 'spawn', 'publish-ports', 'record'],
  /** A pool instance booted to the init's wait for an identity; the claim gives it one, and its app starts. */
  booted: ['resolve-image', 'check-resources', 'attach-network', 'spawn', 'boot', 'publish-ports', 'record'],
  /** Restored from a template's snapshot, then given its own identity. */
  clone: ['resolve-template', 'check-request', 'attach-network', 'spawn', 'restore', 'identity', 'after-clone', 'warm-up', 'publish-ports', 'record'],
  /** A VM found running after a daemon restart: the same last steps as a start. */
  adopted: ['adopt', 'publish-ports', 'record']
} as const satisfies Record<string, readonly string[]>

export type StartPlan = keyof typeof START_PLANS
export type StepName = (typeof START_PLANS)[StartPlan][number] | ClaimStep

/** What a pool claim adds: the wait for an instance, then what hands it over. */
export const CLAIM_STEPS = ['claim-wait', 'resume', 'identity', 'hand-out'] as const
type ClaimStep = (typeof CLAIM_STEPS)[number]

/**
 * Times the steps of one start. `run` refuses a step that is not in the
 * plan, or that comes before one already run: a start path that drifts from
 * its declared list is a bug, not a variant.
 */
export class StepClock {
  readonly plan: StartPlan
  readonly #steps: StartStep[] = []
  readonly #started = performance.now()
  #position = -1

  constructor (plan: StartPlan) {
    this.plan = plan
  }

  async run<T> (name: StepName, step: () => Promise<T> | T): Promise<T> {
    const end = this.begin(name)
    try {
      return await step()
    } finally {
      end()
    }
  }

  /**
   * Starts a step whose end is not a promise of its own (the identity ends
   * inside the control channel's callback, where the hook begins); the
   * returned function ends it, once.
   */
  begin (name: StepName): () => void {
    const list: readonly string[] = START_PLANS[this.plan]
    const at = list.indexOf(name)
    if (at <= this.#position) {
      throw new UigniterError('UIG_ERR_INTERNAL', `start plan ${this.plan} has no step "${name}" after "${list[this.#position] ?? 'its start'}"`)
    }
    this.#position = at
    const started = performance.now()
    let ended = false
    return () => {
      if (ended) return
      ended = true
      this.#steps.push({ name, ms: round(performance.now() - started) })
    }
  }

  /** Adds the guest's own time to the last run of a step (the init reports how long its part took). */
  noteGuestMs (name: StepName, guestMs: number | undefined): void {
    const step = this.#steps.findLast((s) => s.name === name)
    if (step !== undefined && guestMs !== undefined) step.guestMs = round(guestMs)
  }

  /** The steps so far and the time since the clock started. */
  timings (): StartTimings {
    return { plan: this.plan, steps: [...this.#steps], totalMs: round(performance.now() - this.#started) }
  }
}

/** A pool claim's steps, appended to the instance's own start. */
export function withClaimSteps (timings: StartTimings | null, claim: StartStep[], claimMs: number): StartTimings | null {
  if (timings === null) return null
  return { ...timings, steps: [...timings.steps, ...claim.map((s) => ({ ...s, ms: round(s.ms) }))], claimMs: round(claimMs) }
}

function round (ms: number): number {
  return Math.round(ms * 10) / 10
}

/** How long one named step took, when it ran (the last run, for a step a claim repeats). */
export function stepMs (timings: StartTimings | null, name: StepName): number | undefined {
  return timings?.steps.findLast((s) => s.name === name)?.ms
}
