"""Networks: the block network (blocknet), its per-layer-type registries (layers), the built-in
architectures and the invertible networks of the GAIT-prop family."""
