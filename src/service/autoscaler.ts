import { Value } from '@sinclair/typebox/value'
import { AutoscaleSchema, type Autoscale, type ServiceSpec } from '../core/service.js'

/** What the autoscaler sees of a service at one moment. */
export interface ScaleInput {
  spec: Pick<ServiceSpec, 'replicas' | 'autoscale'>
  /** Replicas wanted until now. */
  desired: number
  /** In-flight requests and TCP connections now, and the most over the scale-down cooldown. */
  inFlight: number
  recentPeakInFlight: number
  /** Epoch ms of the last request (0: never). */
  lastRequestAt: number
  /** Requests wait in the gateway for an endpoint. */
  held: number
  lastScaleUpAt: number
  lastScaleDownAt: number
  now: number
}

export interface ScaleDecision { desired: number, reason: string | null }

/** The settings of a service at min 0 that does not say how to scale. */
const DEFAULTS = Object.freeze(Value.Default(AutoscaleSchema, {}) as Autoscale)

/**
 * The autoscaling settings in force: the spec's, or the defaults when the
 * service may scale to zero (min 0) without saying how; undefined for a
 * service with a fixed count.
 */
export function autoscaleSettings (spec: Pick<ServiceSpec, 'replicas' | 'autoscale'>): Autoscale | undefined {
  if (spec.autoscale !== undefined) return spec.autoscale
  return spec.replicas.min === 0 ? DEFAULTS : undefined
}

/**
 * Replicas wanted from the load: enough for `targetInFlight` in-flight
 * requests per replica, within min and max. Up at once after the up
 * cooldown; down one step at a time, judged on the peak over the down
 * cooldown so that a lull between bursts does not stop replicas. To zero
 * only after `idleToZeroMs` without a request; a held request (the
 * service is at zero) always wants one.
 *
 * @example
 * scaleDecision({ spec: { replicas: { min: 1, max: 5 }, autoscale }, desired: 1, inFlight: 30, ... }).desired // 3 with targetInFlight 10
 */
export function scaleDecision (input: ScaleInput): ScaleDecision {
  const { spec, desired, now } = input
  const min = spec.replicas.min
  const max = spec.replicas.max ?? Math.max(min, 1)
  const settings = autoscaleSettings(spec)
  const clamp = (n: number): number => Math.min(max, Math.max(min, n))
  if (settings === undefined) {
    const fixed = clamp(min)
    return { desired: fixed, reason: fixed !== desired ? `fixed at replicas.min ${fixed}` : null }
  }
  // Held requests wait for a replica: they are load as much as the ones in flight.
  const demand = input.inFlight + input.held
  if (desired === 0) {
    if (demand > 0 && max > 0) return { desired: clamp(Math.max(1, Math.ceil(demand / settings.targetInFlight))), reason: 'a request arrived for a service at zero' }
    return { desired: clamp(0), reason: null }
  }
  const wanted = Math.ceil(demand / settings.targetInFlight)
  if (wanted > desired && desired < max && now - input.lastScaleUpAt >= settings.scaleUpCooldownMs) {
    return { desired: clamp(wanted), reason: `${demand} in flight or held over ${desired} replica(s), target ${settings.targetInFlight} each` }
  }
  if (now - input.lastScaleDownAt < settings.scaleDownCooldownMs || now - input.lastScaleUpAt < settings.scaleDownCooldownMs) return { desired: clamp(desired), reason: null }
  const idle = demand === 0 && now - input.lastRequestAt >= settings.idleToZeroMs
  if (idle && min === 0) return { desired: 0, reason: `idle for ${Math.round((now - input.lastRequestAt) / 1000)} s` }
  const peakWanted = Math.max(1, Math.ceil(input.recentPeakInFlight / settings.targetInFlight))
  if (peakWanted < desired && desired > min) {
    return { desired: clamp(desired - 1), reason: `at most ${input.recentPeakInFlight} in flight lately over ${desired} replica(s), target ${settings.targetInFlight} each` }
  }
  return { desired: clamp(desired), reason: null }
}
