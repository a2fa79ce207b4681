import { Counter, Gauge, Histogram, type Registry } from 'prom-client'

/**
 * The figures of one service the metrics read at scrape time (GatewayService
 * has them); declared here so that the metrics need nothing else of it.
 */
export interface MeteredService {
  readonly name: string
  /** Answered requests by status class: index 1 = 1xx ... 5 = 5xx. */
  readonly statusCounts: ArrayLike<number>
  readonly inFlight: number
  readonly held: { readonly size: number }
  readonly upstreamFailures: number
  readonly retries: number
  readonly ejections: number
  readonly tcpConnections: number
  readonly tcpOpen: number
  readonly rejectedHoldLimit: number
  readonly rejectedTimeout: number
  readonly endpoints: { values: () => Iterable<{ readonly id: string, readonly inFlight: number, readonly ejected: boolean }> }
}

/** Seconds: from sub-millisecond proxying to requests held while a service starts. */
const DURATION_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

const STATUS_CLASSES = ['', '1xx', '2xx', '3xx', '4xx', '5xx'] as const

/**
 * The gateway's Prometheus metrics. The counters and gauges are read from
 * the services' own plain counters at scrape time (collect), so that a
 * request costs no label hashing; only the duration histogram is observed
 * per request, through a child cached per service.
 */
export class GatewayMetrics {
  private readonly duration: Histogram<'service'>

  constructor (registry: Registry, services: () => Iterable<MeteredService>, unrouted: () => number) {
    const registers = [registry]
    const gauge = (name: string, help: string, read: (s: MeteredService) => number): void => {
      new Gauge({
        name, help, labelNames: ['service'] as const, registers,
        collect () {
          this.reset()
          for (const s of services()) this.set({ service: s.name }, read(s))
        }
      })
    }
    const counter = (name: string, help: string, read: (s: MeteredService) => number): void => {
      new Counter({
        name, help, labelNames: ['service'] as const, registers,
        collect () {
          this.reset()
          for (const s of services()) this.inc({ service: s.name }, read(s))
        }
      })
    }
    new Counter({
      name: 'uigniter_gateway_requests_total',
      help: 'HTTP requests answered, by service and status class (the gateway\'s own answers included)',
      labelNames: ['service', 'status'] as const,
      registers,
      collect () {
        this.reset()
        for (const s of services()) {
          for (let c = 1; c <= 5; c++) {
            const n = s.statusCounts[c] as number
            if (n > 0) this.inc({ service: s.name, status: STATUS_CLASSES[c] }, n)
          }
        }
      }
    })
    this.duration = new Histogram({
      name: 'uigniter_gateway_request_duration_seconds',
      help: 'HTTP request duration at the gateway, from its arrival (holding included) to the end of the answer',
      labelNames: ['service'] as const,
      buckets: DURATION_BUCKETS,
      registers
    })
    gauge('uigniter_gateway_in_flight', 'HTTP requests in progress and TCP connections open to endpoints', (s) => s.inFlight)
    gauge('uigniter_gateway_held', 'Requests and TCP connections held while the service has no endpoint', (s) => s.held.size)
    counter('uigniter_gateway_upstream_failures_total', 'Connection-level failures of endpoints (refused, reset, timed out, hung up)', (s) => s.upstreamFailures)
    counter('uigniter_gateway_retries_total', 'HTTP requests retried on another endpoint', (s) => s.retries)
    counter('uigniter_gateway_ejections_total', 'Endpoints ejected as outliers', (s) => s.ejections)
    counter('uigniter_gateway_tcp_connections_total', 'TCP connections accepted', (s) => s.tcpConnections)
    gauge('uigniter_gateway_tcp_connections_open', 'TCP connections proxied now', (s) => s.tcpOpen)
    new Counter({
      name: 'uigniter_gateway_rejected_total',
      help: 'Requests and TCP connections turned away for want of an endpoint: hold-limit (too many held) or hold-timeout',
      labelNames: ['service', 'reason'] as const,
      registers,
      collect () {
        this.reset()
        for (const s of services()) {
          this.inc({ service: s.name, reason: 'hold-limit' }, s.rejectedHoldLimit)
          this.inc({ service: s.name, reason: 'hold-timeout' }, s.rejectedTimeout)
        }
      }
    })
    new Gauge({
      name: 'uigniter_gateway_endpoint_in_flight',
      help: 'HTTP requests in progress and TCP connections open, by endpoint',
      labelNames: ['service', 'endpoint'] as const,
      registers,
      collect () {
        this.reset()
        for (const s of services()) for (const e of s.endpoints.values()) this.set({ service: s.name, endpoint: e.id }, e.inFlight)
      }
    })
    new Gauge({
      name: 'uigniter_gateway_endpoint_ejected',
      help: '1 while the endpoint is ejected as an outlier',
      labelNames: ['service', 'endpoint'] as const,
      registers,
      collect () {
        this.reset()
        for (const s of services()) for (const e of s.endpoints.values()) this.set({ service: s.name, endpoint: e.id }, e.ejected ? 1 : 0)
      }
    })
    new Counter({
      name: 'uigniter_gateway_unrouted_requests_total',
      help: 'HTTP requests that named no configured service (answered 404)',
      registers,
      collect () {
        this.reset()
        this.inc(unrouted())
      }
    })
  }

  /** The duration histogram's child of one service, to cache (labels() hashes on each call). */
  durationOf (service: string): Histogram.Internal<'service'> {
    return this.duration.labels({ service })
  }

  /** Forgets a removed service's histogram (the collected metrics forget it on their own). */
  forget (service: string): void {
    this.duration.remove({ service })
  }
}
