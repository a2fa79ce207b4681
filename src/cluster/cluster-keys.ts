/**
 * Where each piece of cluster state lives in the store. One prefix per kind,
 * so that a node watches only what it acts on.
 *
 * | key | written by | leased |
 * |---|---|---|
 * | nodes/NODE | the node: its status | yes: gone when the node is |
 * | cordons/NODE | the API (cordon, drain) | no |
 * | subnets/A.B.C.D-P | a joining node: its VM subnet | no: a node keeps its subnet across restarts |
 * | leader | the leader: its name and API | yes |
 * | services/NAME | the leader: desired state of a service | no |
 * | placements/NODE/REPLICA | the leader: a replica given to a node, with the leader's epoch | no |
 * | replicas/NODE/REPLICA | the node: the replica's VM as it runs | yes |
 * | routes/SERVICE | the leader: the gateway route, its routable endpoints and the ones that died lately | no |
 * | volumes/NAME | the node whose disk holds the volume | no: the volume stays on its node while the node is away |
 */
const ROOT = '/uigniter/'

export const keys = {
  root: ROOT,
  nodes: `${ROOT}nodes/`,
  node: (name: string) => `${ROOT}nodes/${name}`,
  cordons: `${ROOT}cordons/`,
  cordon: (name: string) => `${ROOT}cordons/${name}`,
  subnets: `${ROOT}subnets/`,
  subnet: (cidr: string) => `${ROOT}subnets/${cidr.replace('/', '-')}`,
  leader: `${ROOT}leader`,
  services: `${ROOT}services/`,
  service: (name: string) => `${ROOT}services/${name}`,
  placements: `${ROOT}placements/`,
  nodePlacements: (node: string) => `${ROOT}placements/${node}/`,
  placement: (node: string, replica: string) => `${ROOT}placements/${node}/${replica}`,
  replicas: `${ROOT}replicas/`,
  nodeReplicas: (node: string) => `${ROOT}replicas/${node}/`,
  replica: (node: string, replica: string) => `${ROOT}replicas/${node}/${replica}`,
  routes: `${ROOT}routes/`,
  route: (service: string) => `${ROOT}routes/${service}`,
  volumes: `${ROOT}volumes/`,
  volume: (name: string) => `${ROOT}volumes/${name}`
}

/** The last path part of a key: a node, service or replica name. */
export const lastPart = (key: string): string => key.slice(key.lastIndexOf('/') + 1)

/** NODE and REPLICA of a placements/NODE/REPLICA or replicas/NODE/REPLICA key. */
export function nodeAndReplica (key: string, prefix: string): { node: string, replica: string } | undefined {
  const rest = key.slice(prefix.length).split('/')
  if (rest.length !== 2 || rest[0] === '' || rest[1] === '') return undefined
  return { node: rest[0] ?? '', replica: rest[1] ?? '' }
}
