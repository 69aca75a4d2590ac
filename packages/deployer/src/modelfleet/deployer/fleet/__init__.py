"""Fleet rollouts: target queries, staged health-gated rollouts, device backends."""
