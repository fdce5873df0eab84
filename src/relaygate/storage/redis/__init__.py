"""Short-lived state shared by the nodes of a cluster, in Redis (docs/scale-out.md)."""
