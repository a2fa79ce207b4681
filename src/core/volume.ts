import { Type, type Static } from '@sinclair/typebox'

/**
 * Persistent volumes: a named block device on the host (a sparse file
 * holding an ext4 filesystem) that outlives the VMs it is attached to. One
 * schema is the source of the types, the API validation and the OpenAPI
 * document. Which VMs hold a volume is not stored with the volume: it is
 * read from the live VMs' records (Vm.volumes), so that it can never
 * disagree with them.
 */

/** Volume names: a service's per-replica volumes are `SERVICE-VOLUME-INDEX`, so they must fit too. */
export const VOLUME_NAME = /^[a-z0-9][a-z0-9_.-]{0,62}$/

export const VolumeCreateRequestSchema = Type.Object({
  name: Type.String({ pattern: VOLUME_NAME.source }),
  sizeMiB: Type.Integer({ minimum: 16, maximum: 16 * 1024 * 1024, description: 'The size of the block device; the file on the host is sparse and costs only what the filesystem holds' }),
  fs: Type.Literal('ext4', { default: 'ext4', description: 'The filesystem it is made with' }),
  labels: Type.Record(Type.String({ pattern: '^[A-Za-z0-9_./-]{1,63}$' }), Type.String({ maxLength: 256 }), { default: {}, additionalProperties: false })
}, { additionalProperties: false })
export type VolumeCreateRequest = Static<typeof VolumeCreateRequestSchema>

export const VolumeAttachmentSchema = Type.Object({
  vm: Type.String({ description: 'The VM id' }),
  vmName: Type.String(),
  guestPath: Type.String(),
  readOnly: Type.Boolean()
}, { additionalProperties: false })
export type VolumeAttachment = Static<typeof VolumeAttachmentSchema>

export const VolumeSchema = Type.Object({
  name: Type.String(),
  node: Type.Optional(Type.String({ description: 'The cluster node whose disk holds it (a cluster only)' })),
  sizeMiB: Type.Integer(),
  fs: Type.Literal('ext4'),
  labels: Type.Record(Type.String(), Type.String()),
  service: Type.Union([Type.Object({ name: Type.String(), volume: Type.String(), index: Type.Integer() }, { additionalProperties: false }), Type.Null()], {
    description: 'A service\'s per-replica volume: made for replica `index` of the service, on its first start'
  }),
  path: Type.String({ description: 'The file on the host' }),
  allocatedBytes: Type.Integer({ description: 'What the sparse file takes on the host\'s disk' }),
  usedBytes: Type.Union([Type.Integer(), Type.Null()], { description: 'What the filesystem says it uses, as of its last write back to the disk; null when it cannot be read' }),
  attachments: Type.Array(VolumeAttachmentSchema, { description: 'The live VMs it is attached to' }),
  createdAt: Type.String()
}, { additionalProperties: false })
export type Volume = Static<typeof VolumeSchema>

/** A volume as the store keeps it: what does not change, and nothing that can be measured. */
export interface VolumeRecord {
  name: string
  sizeMiB: number
  fs: 'ext4'
  labels: Record<string, string>
  service: { name: string, volume: string, index: number } | null
  createdAt: string
}

/** A volume attached to a VM: in a VM create request and on the VM's record. */
export const VolumeMountSchema = Type.Object({
  name: Type.String({ pattern: VOLUME_NAME.source, description: 'The volume' }),
  guestPath: Type.String({ pattern: '^/', description: 'Where the guest init mounts it' }),
  readOnly: Type.Boolean({ default: false })
}, { additionalProperties: false })
export type VolumeMount = Static<typeof VolumeMountSchema>

/**
 * A service's volume (ServiceSpec.volumes). `perReplica`: each replica gets
 * its own, `SERVICE-NAME-INDEX`, made with `sizeMiB` on the first start of
 * that index and reattached to whichever replica takes the index later
 * (replacement, rollout, restart), as a StatefulSet's claims are. Otherwise
 * `name` is an existing volume, shared by every replica, read-only.
 */
export const ServiceVolumeSchema = Type.Object({
  name: Type.String({ pattern: '^[a-z0-9][a-z0-9-]{0,15}$', description: 'perReplica: the volume\'s part of each replica\'s volume name; shared: the volume' }),
  guestPath: Type.String({ pattern: '^/' }),
  perReplica: Type.Boolean({ default: false }),
  sizeMiB: Type.Optional(Type.Integer({ minimum: 16, maximum: 16 * 1024 * 1024, description: 'perReplica only, and required there' })),
  readOnly: Type.Optional(Type.Boolean({ description: 'Default: false for perReplica, and a shared volume must be read-only' }))
}, { additionalProperties: false })
export type ServiceVolume = Static<typeof ServiceVolumeSchema>

/** The name of replica `index`'s own volume. */
export function replicaVolumeName (service: string, volume: string, index: number): string {
  return `${service}-${volume}-${index}`
}

/** What a volume's events say. */
export interface VolumeEvent {
  type: 'volume.created' | 'volume.deleted' | 'volume.attached' | 'volume.detached'
  volume: string
  vm?: string
  message: string
  at: string
}
