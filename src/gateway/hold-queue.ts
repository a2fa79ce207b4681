/** A request or connection waiting for an endpoint. */
export interface HeldItem {
  /** An endpoint appeared: forward it now. */
  release (): void
  /** Held past the hold timeout, or the service went away: answer or close it. */
  expire (reason: 'timeout' | 'removed' | 'closed'): void
  holdTimer?: NodeJS.Timeout | undefined
}

/**
 * The requests and connections of one service that wait for an endpoint, in
 * arrival order, each for at most the hold timeout.
 */
export class HoldQueue {
  private items: HeldItem[] = []

  get size (): number {
    return this.items.length
  }

  add (item: HeldItem, timeoutMs: number): void {
    this.items.push(item)
    item.holdTimer = setTimeout(expireHeld, timeoutMs, this, item)
  }

  /** Takes it out without a word (its client went away). */
  remove (item: HeldItem): boolean {
    const i = this.items.indexOf(item)
    if (i < 0) return false
    this.items.splice(i, 1)
    clearTimeout(item.holdTimer)
    item.holdTimer = undefined
    return true
  }

  /** Empties the queue and gives back what it held, oldest first. */
  take (): HeldItem[] {
    const items = this.items
    this.items = []
    for (const item of items) {
      clearTimeout(item.holdTimer)
      item.holdTimer = undefined
    }
    return items
  }
}

function expireHeld (queue: HoldQueue, item: HeldItem): void {
  if (queue.remove(item)) item.expire('timeout')
}
